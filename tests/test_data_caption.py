"""Auto-captioning writes missing sidecars with the checkpoint's Qwen3-VL and never overwrites without asking."""

import shutil

import pytest

from qwen_image_lora.config import load_config
from qwen_image_lora.data.caption import caption_folder
from qwen_image_lora.data.sources import DataError


def test_caption_writes_missing_and_keeps_existing(tmp_path, tiny_model_dir, sample_data_dir):
    root = tmp_path / "brand"
    shutil.copytree(sample_data_dir / "brand", root)
    for txt in sorted(root.glob("*.txt"))[:10]:
        txt.unlink()
    (root / "000.txt").write_text("   \n")  # blank counts as missing
    kept = {p.name: p.read_text() for p in root.glob("*.txt") if p.read_text().strip()}
    cfg = load_config(None, [f"data.path={root}", f"model.pretrained={tiny_model_dir}", "model.dtype=float32"])
    stats = caption_folder(cfg, max_new_tokens=6, log=lambda *_: None)
    assert len(stats.written) == 10 and len(stats.kept) == 2 and not stats.failed
    assert all((root / f"{i:03d}.txt").read_text().strip() for i in range(12))
    assert {n: (root / n).read_text() for n in kept} == kept  # existing captions untouched
    again = caption_folder(cfg, max_new_tokens=6, log=lambda *_: None)
    assert not again.written and len(again.kept) == 12
    forced = caption_folder(cfg, overwrite=True, max_new_tokens=6, log=lambda *_: None)
    assert len(forced.written) == 12


def test_a_datasets_folder_is_refused_as_a_manifest_is(tmp_path):
    """It wrote 12 .txt files into the shared cache beside the dataset's images, which nothing reads."""
    (tmp_path / "hfds").mkdir()
    (tmp_path / "hfds" / "dataset_info.json").write_text("{}")  # what `save_to_disk` leaves: a `datasets` folder
    cfg = load_config(None, [f"data.path={tmp_path / 'hfds'}"])
    with pytest.raises(DataError, match="captioning writes .txt files beside the images, so it needs an image folder"):
        caption_folder(cfg, log=lambda *_: None)
