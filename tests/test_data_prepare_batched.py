"""`data.prepare_batch_size`: `data prepare` encodes same-size images and text-to-image prompts in batches, and the
cache it writes equals one-at-a-time encoding.

Tolerance (fp32 tiny model, CPU): every cached tensor within ATOL = 5e-6 of the one-at-a-time entry, with the same
keys, tensor names, shapes and dtypes; booleans (image_pad) exactly equal. Measured here: batched VAE latents differ
by at most 1.06e-6 (values up to 2.0, a few float32 ulps: a batch's convolutions sum in another order), prompt
embeddings by at most 1.1e-8 (values up to 0.13; the encoder's left padding is masked out, so each prompt attends
to its own tokens only).
"""

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import ConfigError, load_config
from qwen_image_lora.data.cache import Cache, model_identity
from qwen_image_lora.data.doctor import diagnose
from qwen_image_lora.data.prepare import prepare
from qwen_image_lora.data.report import verdicts_dir
from qwen_image_lora.sample_data import draw_product
from tests.test_faults_data import _overwrite_latents

ATOL = 5e-6


def _cfg(data_path, model_dir, out, batch_size, *extra):
    # caption dropout adds "" beside each caption: prompts of very different lengths share a batch (padding).
    return load_config(
        None,
        [
            f"data.path={data_path}",
            f"model.pretrained={model_dir}",
            "model.dtype=float32",
            "data.resolution=160",
            f"output_dir={out}",
            "data.shard_size=5",
            "data.caption_dropout=0.1",
            f"data.prepare_batch_size={batch_size}",
            *extra,
        ],
    )


def _entries(cfg) -> dict[str, dict[str, torch.Tensor]]:
    cache = Cache(cfg.data.cache_dir, model_identity(cfg.model))
    return {key: cache.get(key) for key in cache.keys()}


def _assert_same_cache(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, entry in want.items():
        assert got[key].keys() == entry.keys(), key
        for name, t in entry.items():
            g = got[key][name]
            assert (g.shape, g.dtype) == (t.shape, t.dtype), (key, name)
            if t.dtype == torch.bool:
                assert torch.equal(g, t), (key, name)
            else:
                torch.testing.assert_close(g, t, atol=ATOL, rtol=0, msg=f"{key}/{name}")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, sample_data_dir):
    """The sample manifest (12 text-to-image items in three buckets, 8 edits) plus two edits whose source is another
    size than their target, so one batch holds images of two sizes."""
    root = tmp_path_factory.mktemp("mixed") / "data"
    shutil.copytree(sample_data_dir, root)
    rows = []
    for i, (product, colour) in enumerate([("mug", "#d7263d"), ("box", "#1b998b")]):
        draw_product(product, colour, "#14213d", (160, 128)).save(root / f"wide_source_{i}.png")
        draw_product(product, colour, "#ffffff", (128, 128)).save(root / f"square_target_{i}.png")
        rows.append(
            {
                "target": f"square_target_{i}.png",
                "instruction": f"put the {product} on white",
                "sources": [f"wide_source_{i}.png"],
            }
        )
    with open(root / "manifest.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory, tiny_pipe, tiny_model_dir, manifest):
    """The reference: every item encoded one by one."""
    cfg = _cfg(manifest, tiny_model_dir, tmp_path_factory.mktemp("one"), 1)
    stats = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert not stats.failed and stats.items == 22
    return stats, _entries(cfg)


@pytest.fixture
def calls(monkeypatch):
    """Batch sizes of the encoder calls (our model module's functions, which every encode goes through)."""
    seen = {"latents": [], "prompts": [], "padded": 0}
    enc_l, enc_p = qmodel.encode_latents, qmodel.encode_prompt

    def latents(pipe, pixels):
        seen["latents"].append(pixels.shape[0])
        return enc_l(pipe, pixels)

    def prompts(pipe, texts, images=None):
        seen["prompts"].append(len(texts))
        out = enc_p(pipe, texts, images)
        seen["padded"] += out.mask is not None
        return out

    monkeypatch.setattr(qmodel, "encode_latents", latents)
    monkeypatch.setattr(qmodel, "encode_prompt", prompts)
    return seen


@pytest.mark.parametrize("batch_size", [4, 3])  # 3 divides neither the 22 items nor any layout group evenly
def test_batched_prepare_writes_the_one_at_a_time_cache(
    batch_size, one_at_a_time, calls, tmp_path, tiny_pipe, tiny_model_dir, manifest, caplog
):
    ref_stats, want = one_at_a_time
    cfg = _cfg(manifest, tiny_model_dir, tmp_path, batch_size)
    with caplog.at_level(logging.WARNING):
        stats = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert not stats.failed and stats.items == ref_stats.items
    assert not caplog.records  # no batch failed over to one at a time
    assert (stats.latents_encoded, stats.prompts_encoded) == (ref_stats.latents_encoded, ref_stats.prompts_encoded)
    # it really batched: full batches of same-size images, padded prompt batches, never more than asked
    assert max(calls["latents"]) == max(calls["prompts"]) == batch_size
    assert sum(calls["latents"]) == stats.latents_encoded and len(calls["latents"]) < stats.latents_encoded
    assert calls["padded"] > 0
    assert len({e["latents"].shape for e in want.values() if "latents" in e}) >= 2  # several bucket sizes
    _assert_same_cache(_entries(cfg), want)
    # already cached: a rerun encodes nothing
    again = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert again.cached == again.items and again.latents_encoded + again.prompts_encoded == 0


def test_damaged_entry_is_reencoded_in_a_batched_prepare(one_at_a_time, tmp_path, tiny_pipe, tiny_model_dir, manifest):
    cfg = _cfg(manifest, tiny_model_dir, tmp_path, 4)
    prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    _overwrite_latents(sorted((Path(cfg.data.cache_dir) / "shards").glob("*.safetensors"))[1])
    again = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert again.damaged == 1 and (again.latents_encoded, again.prompts_encoded) == (1, 0)
    _assert_same_cache(_entries(cfg), one_at_a_time[1])


def test_ranks_each_batch_their_own_share(one_at_a_time, tmp_path, tiny_pipe, tiny_model_dir, manifest):
    cfg = _cfg(manifest, tiny_model_dir, tmp_path, 4)
    shares = [prepare(cfg, tiny_pipe, rank=r, world_size=2, progress=False, log=lambda *_: None) for r in (0, 1)]
    assert [s.items for s in shares] == [11, 11] and not any(s.failed for s in shares)
    assert {p.stem.split("-")[-2] for p in (Path(cfg.data.cache_dir) / "shards").glob("*.json")} == {"r000", "r001"}
    _assert_same_cache(_entries(cfg), one_at_a_time[1])


def test_a_corrupt_image_in_a_batch_is_named_and_its_batch_mates_cached(
    tmp_path, tiny_pipe, tiny_model_dir, sample_data_dir, caplog
):
    root = tmp_path / "brand"
    shutil.copytree(sample_data_dir / "brand", root)
    cfg = _cfg(root, tiny_model_dir, tmp_path / "out", 4)
    report = diagnose(cfg, contact_sheet=False)  # the file breaks after the doctor passed it
    bad, jpeg = root / "000.png", io.BytesIO()
    Image.open(bad).save(jpeg, "JPEG")  # a PNG's size check reads the whole file; a JPEG's reads its header only
    bad.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])  # planned (size known), its pixels cut short
    with caplog.at_level(logging.WARNING):
        stats = prepare(cfg, tiny_pipe, report=report, progress=False, log=lambda *_: None)
    assert any("a batch of" in r.getMessage() for r in caplog.records)  # the batch failed, then went one by one
    assert list(stats.failed) == ["000.png"] and "truncated" in stats.failed["000.png"]
    recorded = json.loads((verdicts_dir(cfg) / "prepare-r000.json").read_text())["excluded"]
    assert list(recorded) == ["000.png"]
    # every other item, its batch-mates included, is complete: a rerun finds them cached and retries only the bad one
    again = prepare(cfg, tiny_pipe, report=report, progress=False, log=lambda *_: None)
    assert again.cached == again.items - 1 and list(again.failed) == ["000.png"]
    assert again.latents_encoded + again.prompts_encoded == 0


def test_prepare_batch_size_below_one_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"data\.prepare_batch_size: must be >= 1"):
        load_config(None, ["data.prepare_batch_size=0"])
