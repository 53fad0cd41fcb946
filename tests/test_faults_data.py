"""Reliability of the data path (issue 11): bad files never crash training, with or without a prior
`data doctor`; a damaged cache shard is named and its entries re-encoded or refused, never trained on."""

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_lora.config import load_config
from qwen_image_lora.data.cache import CacheDamaged
from qwen_image_lora.data.dataset import MemoryCache, build_training_data
from qwen_image_lora.data.doctor import diagnose
from qwen_image_lora.data.prepare import prepare
from qwen_image_lora.data.report import verdicts_dir
from qwen_image_lora.data.sources import DataError, format_caption, load_items
from qwen_image_lora.images import ImageInputError, read_image


def _photo(w, h, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (Pillow refuses it as a decompression bomb on open)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_an_image_over_pils_own_bomb_limit_is_refused_in_the_same_words_as_one_under_it():
    """Under PIL's limit (2 x 89.5 M pixels) it said "image is 8192x8192 = ... pixels; the limit is ..."; over it,
    PIL's text: "Image size (900000000 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS
    attack"."""
    for width, height, said in ((9000, 9000, "image is 9000x9000 = 81,000,000 pixels"),
                                (30000, 30000, "image is 900,000,000 pixels")):  # fmt: skip
        with pytest.raises(ImageInputError) as refused:
            read_image(_bomb_png(width, height), max_pixels=64 * 2**20)
        assert str(refused.value) == f"{said}; the limit is 67,108,864" and refused.value.too_large


def make_messy_folder(root):
    """Four good captioned items and one of each bad kind; returns {file name: the reason's code}."""
    root.mkdir(parents=True)
    for i in range(4):
        _photo(160, 128, seed=i).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"a qwnbrand photo {i}")
    buf = io.BytesIO()
    _photo(256, 256, seed=9).save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "bomb.png").write_bytes(_bomb_png(20000, 20000))
    _photo(128, 128, seed=10).save(root / "latin1.png")
    (root / "latin1.txt").write_bytes("a qwnbrand caf\xe9 photo".encode("latin-1"))
    _photo(24, 24, seed=11).save(root / "tiny.png")
    _photo(1000, 100, seed=12).save(root / "banner.png")
    _photo(128, 128, seed=13).save(root / "uncaptioned.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    for name in ("truncated", "bomb", "tiny", "banner", "loop"):
        (root / f"{name}.txt").write_text(f"a qwnbrand {name} photo")
    return {
        "truncated.jpg": "truncated",
        "bomb.png": "huge",
        "latin1.png": "caption-not-utf8",
        "tiny.png": "too-small",
        "banner.png": "extreme-aspect",
        "uncaptioned.png": "missing-caption",
        "loop.png": "symlink-loop",
    }


def _cfg(root, model_dir, tmp_path, *extra):
    return load_config(
        None,
        [
            f"data.path={root}",
            f"model.pretrained={model_dir}",
            "model.dtype=float32",
            "data.resolution=128",
            f"output_dir={tmp_path / 'out'}",
            *extra,
        ],
    )


def _skip_warnings(caplog):
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("skipping")
    ]


def test_training_without_doctor_skips_each_bad_file_once_and_trains(tmp_path, tiny_pipe, tiny_model_dir, caplog):
    bad = make_messy_folder(tmp_path / "messy")
    cfg = _cfg(tmp_path / "messy", tiny_model_dir, tmp_path)
    with caplog.at_level(logging.WARNING):
        data = build_training_data(cfg, tiny_pipe)
    assert sorted(e.item.id for e in data.dataset.entries) == [f"good{i}.png" for i in range(4)]
    warnings = _skip_warnings(caplog)
    doctor = diagnose(cfg, tokenizer=None, contact_sheet=False)
    for name, code in bad.items():
        mine = [w for w in warnings if w.startswith(f"skipping {name}:")]
        (error,) = [f for f in doctor.findings if f.item == name and f.severity == "error"]
        assert error.code == code and mine == [f"skipping {name}: {code}: {error.message}"], (name, warnings)
    assert len(warnings) == len(bad)  # each names its own problem, in the doctor's words, and no other item's
    for index in range(len(data.dataset)):  # every kept entry encodes: nothing left to crash mid-run
        assert data.dataset.sample(index, data.dataset.texts_for(index)[0])["latents"].ndim == 5


def test_training_names_a_gif_named_png_and_trains_it_as_the_doctor_keeps_it(
    tmp_path, tiny_pipe, tiny_model_dir, caplog
):
    """Issue #24: it trained silently. Training says what it is, as the doctor does, once, and trains its first frame."""
    folder = tmp_path / "gif"
    folder.mkdir()
    for i in range(2):
        _photo(128, 128, seed=i).save(folder / f"good{i}.png")
    frames = [_photo(128, 128, seed=i).convert("P") for i in range(2, 5)]
    frames[0].save(folder / "anim.png", format="GIF", save_all=True, append_images=frames[1:])
    for name in ("good0", "good1", "anim"):
        (folder / f"{name}.txt").write_text(f"a qwnbrand {name} photo")
    with caplog.at_level(logging.WARNING):
        data = build_training_data(_cfg(folder, tiny_model_dir, tmp_path), tiny_pipe)
    assert sorted(e.item.id for e in data.dataset.entries) == ["anim.png", "good0.png", "good1.png"]
    named = [r.getMessage() for r in caplog.records if "anim.png" in r.getMessage()]
    assert named == ["training anim.png, image anim.png: a GIF file named .png (not JPEG, PNG or WebP; 3 frames, only "
                     "the first trains); it decodes, so it is kept"]  # fmt: skip
    index = next(i for i, e in enumerate(data.dataset.entries) if e.item.id == "anim.png")
    assert data.dataset.sample(index, data.dataset.texts_for(index)[0])["latents"].ndim == 5


def test_training_counts_caption_tokens_with_the_model_tokenizer(tmp_path, tiny_pipe, tiny_model_dir, caplog):
    """A caption over data.max_caption_tokens, counted by the pipeline's own tokenizer, is skipped as the doctor
    skips it; at the limit it trains."""
    folder = tmp_path / "captions"
    folder.mkdir()
    captions = {"good0": "a qwnbrand photo", "good1": "a qwnbrand mug", "long": "a qwnbrand " + "red mug, " * 40}
    for i, (name, caption) in enumerate(captions.items()):
        _photo(128, 128, seed=i).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    tokenizer = tiny_pipe.processor.tokenizer
    cfg = _cfg(folder, tiny_model_dir, tmp_path)
    n = len(tokenizer(format_caption(captions["long"], cfg.data), add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.WARNING):
        data = build_training_data(
            _cfg(folder, tiny_model_dir, tmp_path, f"data.max_caption_tokens={n - 1}"), tiny_pipe
        )
    assert sorted(e.item.id for e in data.dataset.entries) == ["good0.png", "good1.png"]
    (warning,) = _skip_warnings(caplog)
    assert warning.startswith(f"skipping long.png: caption-too-long: {n} tokens, over data.max_caption_tokens={n - 1}:")
    at_limit = build_training_data(_cfg(folder, tiny_model_dir, tmp_path, f"data.max_caption_tokens={n}"), tiny_pipe)
    assert sorted(e.item.id for e in at_limit.dataset.entries) == ["good0.png", "good1.png", "long.png"]


def test_many_skipped_items_are_named_ten_at_most_and_the_rest_counted(tmp_path, tiny_pipe, tiny_model_dir, caplog):
    """Training printed a warning line per skipped item (500 uncaptioned images, 500 lines); the doctor groups them."""
    folder = tmp_path / "mostly-uncaptioned"
    folder.mkdir()
    for i in range(14):
        Image.new("RGB", (64, 64), (i * 15, 0, 0)).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("qwnbrand")
    (folder / "img1.png").write_bytes(b"")  # and one that is empty
    with caplog.at_level(logging.WARNING):
        data = build_training_data(_cfg(folder, tiny_model_dir, tmp_path), tiny_pipe)
    assert [e.item.id for e in data.dataset.entries] == ["img0.png"]
    said = _skip_warnings(caplog)
    assert len(said) == 11 and all(line.startswith("skipping img") for line in said[:10])
    assert said[10] == "skipping 3 more items (3 missing-caption); `qwen-lora data doctor` lists them"


def test_a_folder_with_no_readable_item_is_a_data_error_counting_them(tmp_path, tiny_pipe, tiny_model_dir):

    folder = tmp_path / "allbad"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.png").write_bytes(b"")  # a 0-byte image with a good caption
        (folder / f"{name}.txt").write_text("qwnbrand")
    with pytest.raises(DataError, match=r"^data.path: none of the 2 items can train \(2 empty-file\); run `qwen-lora"):
        build_training_data(_cfg(folder, tiny_model_dir, tmp_path), tiny_pipe)
    for name in ("a", "b"):  # readable images without captions were said to be unreadable
        Image.new("RGB", (64, 64)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").unlink()
    with pytest.raises(DataError, match=r"^data.path: none of the 2 items can train \(2 missing-caption\); run"):
        build_training_data(_cfg(folder, tiny_model_dir, tmp_path), tiny_pipe)


def test_doctor_names_the_non_utf8_caption_and_the_symlink_loop(tmp_path, tiny_model_dir):
    bad = make_messy_folder(tmp_path / "messy")
    report = diagnose(_cfg(tmp_path / "messy", tiny_model_dir, tmp_path), tokenizer=None)
    for name, code in bad.items():
        assert code in report.excluded.get(name, []), (name, report.excluded.get(name))
    latin1 = next(f for f in report.findings if f.item == "latin1.png")
    assert "latin1.txt" in latin1.message and "UTF-8" in latin1.message
    assert not any(report.excluded.get(f"good{i}.png") for i in range(4))


def test_training_trusts_the_doctor_only_for_files_it_judged(tmp_path, tiny_pipe, tiny_model_dir, caplog):
    make_messy_folder(tmp_path / "messy")
    cfg = _cfg(tmp_path / "messy", tiny_model_dir, tmp_path)
    report = diagnose(cfg, tokenizer=None)
    report.write_json(verdicts_dir(cfg) / "doctor.json")
    # damaged after the doctor ran: training must check it again
    good3 = tmp_path / "messy" / "good3.png"
    good3.write_bytes(good3.read_bytes()[:200])
    _photo(128, 128, seed=20).save(tmp_path / "messy" / "tiny.png")  # excluded, then fixed: checked again, trains
    with caplog.at_level(logging.INFO):
        data = build_training_data(cfg, tiny_pipe)
    assert sorted(e.item.id for e in data.dataset.entries) == [f"good{i}.png" for i in range(3)] + ["tiny.png"]
    warnings = _skip_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith(
        "skipping good3.png:"
    )  # the doctor's own verdicts are not repeated
    # What it excluded and is unchanged is left out with its codes, unchecked; only the two changed files are checked.
    items = [it.id for it in load_items(cfg.data)]
    by_doctor = [i for i in items if i in report.excluded and i != "tiny.png"]
    assert dict((it.id, why) for it, why in data.skipped) == {
        **{i: "excluded by the data doctor: " + ", ".join(report.excluded[i]) for i in by_doctor},
        "good3.png": warnings[0].removeprefix("skipping good3.png: "),
    }
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert [m for m in said if " items not judged by the data doctor" in m][0].startswith(f"2 of {len(items)} items ")
    assert (f"{len(by_doctor)} items left out as the data doctor or `data prepare` excluded them "
            f"(e.g. {', '.join(by_doctor[:3])}); see {verdicts_dir(cfg)}") in said  # fmt: skip


# ------------------------------------------------------------------------------------------ verified cache


def _overwrite_latents(shard) -> str:
    """Overwrite the first latents tensor stored in `shard` with other bytes (same size); returns its key."""
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k.endswith("/latents"))
    start, end = (8 + n + o for o in header[name]["data_offsets"])
    raw[start:end] = bytes(reversed(raw[start:end]))
    shard.write_bytes(bytes(raw))
    return name.split("/")[0]


@pytest.fixture
def prepared(tmp_path, tiny_pipe, tiny_model_dir, sample_data_dir):

    cfg = _cfg(sample_data_dir / "brand", tiny_model_dir, tmp_path, "data.shard_size=4")
    first = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert first.latents_encoded == first.items and first.damaged == 0
    return cfg, sorted((Path(cfg.data.cache_dir) / "shards").glob("*.safetensors"))


def test_prepare_verifies_shards_and_reencodes_damaged_entries(prepared, tiny_pipe, caplog):

    cfg, shards = prepared
    cut, hit = shards[0], shards[1]
    n_cut = len(json.loads(cut.with_suffix(".json").read_text())["keys"])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    _overwrite_latents(hit)
    with caplog.at_level(logging.WARNING):
        again = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    named = " ".join(r.getMessage() for r in caplog.records)
    assert cut.name in named and hit.name in named
    assert again.damaged == n_cut + 1 and again.cached < again.items
    # exactly the damaged entries are encoded again (the cut shard's may include embeddings)
    assert again.latents_encoded + again.prompts_encoded == n_cut + 1
    third = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert third.damaged == 0 and third.cached == third.items and third.latents_encoded + third.prompts_encoded == 0
    assert (cut.parent.parent / "damaged" / cut.name).is_file()  # moved aside, not deleted


def test_training_never_trains_on_overwritten_latents(prepared, tiny_pipe, caplog):

    cfg, shards = prepared
    key = _overwrite_latents(shards[1])
    no_encoders = type("P", (), {"vae": None, "text_encoder": None})()
    data = build_training_data(cfg, no_encoders)
    index = next(i for i in range(len(data.dataset)) if data.dataset.keys(i, data.dataset.texts_for(i)[0])[0] == key)
    with pytest.raises(CacheDamaged, match=shards[1].name + ".*data prepare"):  # no encoder to redo it: a clear stop
        data.dataset.sample(index, data.dataset.texts_for(index)[0])
    # with the encoders loaded, the entry is named and encoded again: the latents equal a fresh encoding
    data = build_training_data(cfg, tiny_pipe)
    with caplog.at_level(logging.WARNING):
        redone = data.dataset.sample(index, data.dataset.texts_for(index)[0])["latents"]
    assert any(shards[1].name in r.getMessage() for r in caplog.records)
    fresh = build_training_data(cfg, tiny_pipe, cache=MemoryCache())
    assert torch.equal(redone, fresh.dataset.sample(index, fresh.dataset.texts_for(index)[0])["latents"])


def test_a_manifest_that_is_not_utf8_is_named(tmp_path):

    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes('{"image": "a.png", "caption": "caf\xe9"}\n'.encode("latin-1"))
    cfg = load_config(None, [f"data.path={manifest}"])
    with pytest.raises(DataError, match=r"m.jsonl:1: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_items(cfg.data)
