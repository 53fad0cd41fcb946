"""Buckets, aligned crops, deterministic resumable sampling and homogeneous batches."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_lora.config import load_config
from qwen_image_lora.data.buckets import assign_bucket
from qwen_image_lora.data.dataset import build_training_data, plan_entries
from qwen_image_lora.data.sources import DataError, load_items


def test_buckets_are_the_pipelines_own_sizes_in_multiples_of_32():
    assert assign_bucket(1024, 1024, 1024) == (1024, 1024)
    # 1920x1080 trains at the size the pipeline resizes it to as an edit input (it once trained at 1344x768).
    assert assign_bucket(1920, 1080, 1024) == (1376, 768)
    for w, h in [(1920, 1080), (1000, 3000), (4000, 1000), (333, 777)]:
        bw, bh = assign_bucket(w, h, 512, max_upscale=10)
        assert bw % 32 == 0 and bh % 32 == 0 and abs(bw * bh / 512**2 - 1) < 0.1 and abs(bw / bh / (w / h) - 1) < 0.1
    # no upscaling beyond the limit: a small image gets a small bucket
    assert assign_bucket(300, 300, 1024, max_upscale=1.0) == (288, 288)


def test_edit_pair_markers_stay_at_the_same_latent_position(tmp_path):
    """Source and target of the same size get the identical resize + crop, so a marker stays put."""
    for name in ("src", "tgt"):
        a = np.full((300, 500, 3), 255, np.uint8)
        a[200:216, 320:336] = (255, 0, 0)  # the marker, same spot in both
        if name == "tgt":
            a[:40] = (0, 0, 255)  # the edit: a different top band
        Image.fromarray(a).save(tmp_path / f"{name}.png")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"target": "tgt.png", "instruction": "blue sky", "sources": ["src.png"]}) + "\n"
    )
    cfg = load_config(None, [f"data.path={tmp_path / 'm.jsonl'}", "data.resolution=256", "data.crop=random"])

    (entry,), _ = plan_entries(load_items(cfg.data), cfg)
    assert entry.sources[0] == entry.target
    src = np.asarray(entry.sources[0].apply(Image.open(tmp_path / "src.png").convert("RGB")))
    tgt = np.asarray(entry.target.apply(Image.open(tmp_path / "tgt.png").convert("RGB")))
    red = lambda a: np.argwhere((a[..., 0] > 200) & (a[..., 1] < 60)).mean(0)  # noqa: E731
    np.testing.assert_allclose(red(src), red(tgt))
    assert src.shape[0] % 32 == 0 and src.shape[1] % 32 == 0


def test_training_batches_from_sample_data(tiny_pipe, tiny_model_dir, sample_data_dir):
    for path, kind in ((sample_data_dir / "brand", "t2i"), (sample_data_dir / "edits" / "manifest.jsonl", "edit")):
        cfg = load_config(
            "configs/demo.yaml", [f"data.path={path}", f"model.pretrained={tiny_model_dir}", "train.batch_size=2"]
        )
        data = build_training_data(cfg, tiny_pipe)
        batch = next(iter(data.loader()))
        assert batch.kind == kind and batch.latents.shape[0] == 2
        n_slots = batch.prompt.image_pad[0].sum().item()
        assert n_slots == sum(c.shape[-1] * c.shape[-2] // 4 for c in batch.cond_latents)


def test_caption_choice_and_dropout_are_deterministic(tiny_pipe, tiny_model_dir, tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first caption\nsecond caption\n")
    cfg = load_config(
        None, [f"data.path={tmp_path}", "data.caption_dropout=0.3", "data.caption_template=sks, {caption}"]
    )
    data = build_training_data(cfg, tiny_pipe)
    seen = [data.dataset.caption_for(0, epoch) for epoch in range(40)]
    assert seen == [data.dataset.caption_for(0, epoch) for epoch in range(40)]
    assert set(seen) == {"", "sks, first caption", "sks, second caption"}


def test_bad_manifest_names_the_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"target": "b.png", "instruction": "y"}\n')
    cfg = load_config(None, [f"data.path={tmp_path / 'm.jsonl'}"])
    with pytest.raises(DataError, match=r"m.jsonl:2: edit rows need .* missing sources"):
        load_items(cfg.data)


def test_an_edit_mask_is_turned_by_its_exif_as_its_target_is(tiny_pipe, tmp_path):
    """A phone exports the target and its mask stored sideways with EXIF orientation 6; the loss weights must follow
    the turned target. The mask was read without EXIF: its stored left half weighed the displayed left half."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the stored left half is the displayed top half
    for name in ("src", "tgt"):
        Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png", exif=exif)
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 64, 64))
    mask.save(tmp_path / "mask.png", exif=exif)
    row = {"target": "tgt.png", "instruction": "make it red", "sources": ["src.png"], "mask": "mask.png"}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    cfg = load_config(
        None,
        [
            f"data.path={tmp_path / 'm.jsonl'}",
            "data.resolution=128",
            "data.min_side=16",
            "train.mask_loss_weight=4.0",
            f"output_dir={tmp_path / 'out'}",
            "data.cache_dir=null",
        ],
    )
    batch = next(iter(build_training_data(cfg, tiny_pipe).loader()))
    weights = batch.loss_mask[0, 0, 0]
    h, w = weights.shape
    assert h > w  # the target trains upright (taller than wide)
    assert torch.allclose(weights[: h // 2], torch.tensor(4.0)) and torch.allclose(weights[h // 2 :], torch.tensor(1.0))


def test_batches_cut_short_by_small_buckets_are_said(tiny_pipe, tiny_model_dir, sample_data_dir, tmp_path, caplog):
    """batch_size 4 over buckets of 9, 1 and 1 trains most steps on one image, each weighing 4x: said only when no
    bucket could fill a batch."""
    data = tmp_path / "data"
    shutil.copytree(sample_data_dir / "brand", data)
    for image, size in zip(sorted(data.glob("*.png"))[:2], [(256, 128), (128, 256)], strict=True):
        Image.open(image).resize(size).save(image)
    base = [f"data.path={data}", f"model.pretrained={tiny_model_dir}", "validation.held_out_fraction=0"]
    caplog.set_level("WARNING")
    build_training_data(load_config("configs/demo.yaml", [*base, "train.batch_size=4"]), tiny_pipe)
    assert "train.batch_size=4: 3 of 5 batches an epoch hold at most half of it" in caplog.text
    caplog.clear()
    build_training_data(load_config("configs/demo.yaml", [*base, "train.batch_size=2"]), tiny_pipe)
    assert "batches an epoch" not in caplog.text  # 1, 1 and 10 items at 2: 2 of 7 short


def test_a_batch_size_no_bucket_can_fill_and_a_held_out_share_that_leaves_little_are_said(
    tiny_pipe, tiny_model_dir, sample_data_dir, caplog
):
    """Both trained without a word: batches of at most the largest bucket (11 here, not 64), and 1 item of 12."""
    base = [f"data.path={sample_data_dir / 'brand'}", f"model.pretrained={tiny_model_dir}"]
    caplog.set_level("WARNING")
    build_training_data(load_config("configs/demo.yaml", [*base, "train.batch_size=64"]), tiny_pipe)
    assert "train.batch_size=64, but the largest bucket holds 11 items: no batch is larger than that" in caplog.text
    caplog.clear()
    build_training_data(load_config("configs/demo.yaml", [*base, "validation.held_out_fraction=0.9"]), tiny_pipe)
    assert "validation.held_out_fraction=0.9 holds out" in caplog.text and "only" in caplog.text
    with pytest.raises(DataError, match=r"^validation.held_out_fraction: 0.99 holds out all 12 items, leaving none"):
        build_training_data(load_config("configs/demo.yaml", [*base, "validation.held_out_fraction=0.99"]), tiny_pipe)
    caplog.set_level("INFO")  # a usual share: which items, in one line (only the bucket count dropped)
    data = build_training_data(load_config("configs/demo.yaml", [*base, "validation.held_out_fraction=0.2"]), tiny_pipe)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("held out ")]
    first = data.dataset.entries[data.held_out[0]].item.id
    assert line.startswith(f"held out {len(data.held_out)} of 12 items for the held-out loss") and first in line


def test_a_manifests_held_out_items_stay_held_out_when_a_row_is_inserted(tmp_path, tiny_pipe, tiny_model_dir):
    """The draw went by line number: one row added at the top moved items the run had trained on into the held-out
    set, and `qwen-lora eval` scored them as unseen."""
    for i in range(24):
        Image.new("RGB", (64, 64), (i * 10, 40, 90)).save(tmp_path / f"p{i:02d}.png")
    rows = [json.dumps({"image": f"p{i:02d}.png", "caption": f"qwnbrand {i}"}) for i in range(24)]
    manifest = tmp_path / "m.jsonl"

    def held_out(lines, fraction=0.3):
        manifest.write_text("\n".join(lines) + "\n")
        cfg = load_config("configs/demo.yaml", [f"data.path={manifest}", f"model.pretrained={tiny_model_dir}",
                                                f"validation.held_out_fraction={fraction}", "data.cache_dir=null"])  # fmt: skip
        data = build_training_data(cfg, tiny_pipe)
        return {data.dataset.entries[i].item.target.name for i in data.held_out}

    before = held_out(rows)
    assert 0 < len(before) < 24
    # With too few items for the draw to pick any, one is still held out: the last one was, so each file added (or
    # added before a resume) moved it. Now the lowest draw is: it moves only when a new item draws lower still.
    picks = [held_out(rows[:n], fraction=0.001) for n in range(3, 11)]
    assert all(len(pick) == 1 for pick in picks), picks
    assert sum(a != b for a, b in zip(picks, picks[1:])) <= 2, picks  # the last item's rule: 7 moves in 7 additions
    Image.new("RGB", (64, 64), (5, 5, 5)).save(tmp_path / "new.png")
    after = held_out([json.dumps({"image": "new.png", "caption": "qwnbrand new"}), *rows])
    assert after - {"new.png"} == before


def test_the_held_out_loss_uses_each_items_first_caption_whatever_the_seed_or_dropout(
    tmp_path, tiny_pipe, tiny_model_dir
):
    """It went through the training draw: a random one of the item's captions, and under caption dropout none."""
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 40, 40, 90)).save(tmp_path / f"p{i}.png")
        (tmp_path / f"p{i}.txt").write_text(f"qwnbrand first {i}\nqwnbrand second {i}\nqwnbrand third {i}\n")
    prompts = []
    for seed in range(4):
        cfg = load_config("configs/demo.yaml", [f"data.path={tmp_path}", f"model.pretrained={tiny_model_dir}",
                                                "validation.held_out_fraction=0.5", "data.caption_dropout=0.9",
                                                f"train.seed={seed}", "data.cache_dir=null"])  # fmt: skip
        data = build_training_data(cfg, tiny_pipe)
        (index, *_), (batch, *_) = data.held_out, data.held_out_batches()
        first = data.dataset.sample(index, f"qwnbrand first {data.dataset.entries[index].item.id[1]}")["prompt"]
        assert torch.equal(batch.prompt.embeds, first.embeds)
        prompts.append(batch.prompt.embeds)
    assert all(torch.equal(p, prompts[0]) for p in prompts)
