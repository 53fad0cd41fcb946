"""The cache and `data prepare`: bad items never crash it, a changed caption re-embeds one item, markers stay
aligned through bucket + crop, interrupted runs resume, two processes share one cache."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import load_config
from qwen_image_lora.data import doctor
from qwen_image_lora.data.cache import Cache, key_for_image, key_for_prompt, model_identity
from qwen_image_lora.data.dataset import build_training_data
from qwen_image_lora.data.doctor import probe_image
from qwen_image_lora.data.prepare import prepare
from qwen_image_lora.data.report import verdicts_dir
from qwen_image_lora.data.sources import open_image
from qwen_image_lora.io import WriteError, describe_write_error
from tests.launch import accelerate_launch
from tests.test_data_doctor import make_bad_folder


def _cfg(data_path, model_dir, tmp_path, *extra):
    return load_config(
        None,
        [
            f"data.path={data_path}",
            f"model.pretrained={model_dir}",
            "model.dtype=float32",
            "data.resolution=128",
            f"output_dir={tmp_path / 'out'}",
            "data.shard_size=4",
            *extra,
        ],
    )


@pytest.fixture
def count_encodes(monkeypatch):
    calls = {"latents": 0, "prompts": 0}
    enc_l, enc_p = qmodel.encode_latents, qmodel.encode_prompt

    def latents(*a, **k):
        calls["latents"] += 1
        return enc_l(*a, **k)

    def prompts(*a, **k):
        calls["prompts"] += 1
        return enc_p(*a, **k)

    monkeypatch.setattr(qmodel, "encode_latents", latents)
    monkeypatch.setattr(qmodel, "encode_prompt", prompts)
    return calls


def test_cache_roundtrip_keys_and_shards(tmp_path):
    a = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(a)
    k = key_for_image(a, (64, 64), "m1", "alpha=keep")
    assert k == key_for_image(a, (64, 64), "m1", "alpha=keep")
    assert (
        len(
            {
                k,
                key_for_image(a, (32, 64), "m1", "alpha=keep"),
                key_for_image(a, (64, 64), "m2", "alpha=keep"),
                key_for_image(a, (64, 64), "m1", "alpha=composite:#ffffff"),
            }
        )
        == 4
    )
    assert key_for_prompt("x", [k], "m1") != key_for_prompt("x", [], "m1") != key_for_prompt("y", [], "m1")
    with Cache(tmp_path / "c", "m1", writable=True, items_per_shard=2) as cache:
        for i in range(4):
            cache.put(f"k{i}", {"latents": torch.full((1, 4, 1, 2, 2), float(i))})
        cache.put("p", {"embeds": torch.ones(1, 3, 8), "image_pad": torch.zeros(1, 3, dtype=torch.bool)})
        assert cache.has("p") and cache.written == 4  # "p" pending until close
    reader = Cache(tmp_path / "c", "m1")
    assert len(reader) == 5 and reader.latents("k3")[0, 0, 0, 0, 0] == 3.0
    assert reader.embeds("p").embeds.shape == (1, 3, 8) and reader.get("missing") is None
    assert len(list((tmp_path / "c" / "shards").glob("*.safetensors"))) == 3
    with pytest.raises(RuntimeError, match="read-only"):
        reader.put("x", {"latents": torch.zeros(1)})


def test_prepare_survives_bad_data_and_caches_clean_items(tmp_path, tiny_pipe, tiny_model_dir, count_encodes):
    root = tmp_path / "bad"
    make_bad_folder(root)
    cfg = _cfg(root, tiny_model_dir, tmp_path, "data.trigger_word=qwnbrand", "data.alpha=keep")
    printed = []
    stats = prepare(cfg, tiny_pipe, progress=False, log=printed.append)
    doctor = json.loads((verdicts_dir(cfg) / "doctor.json").read_text())
    clean = doctor["summary"]["clean"]
    # the exact duplicate is excluded (trained once), so every clean item has its own latents
    assert "copy_of_good0.png" in doctor["excluded"] and "good0.png" not in doctor["excluded"]  # the later file
    assert not stats.failed and stats.items == clean and stats.latents_encoded == clean
    # the doctor's findings are `data doctor`'s to print: prepare says it in one line, no table
    doctor_lines = [line for text in printed for line in text.splitlines() if "truncated" in line or "severity" in line]
    assert len(doctor_lines) == 1 and doctor_lines[0].startswith("data doctor:") and "doctor.json" in doctor_lines[0]
    # every caption line is embedded: the good items carry two captions each
    assert count_encodes["prompts"] == stats.prompts_encoded > clean
    # training reads the cache, with the doctor's exclusions, and never needs the encoders

    pipe_without_encoders = type("P", (), {"vae": None, "text_encoder": None})()
    data = build_training_data(cfg, pipe_without_encoders)
    assert len(data.dataset) == clean and {i.id for i, _ in data.skipped} == set(doctor["excluded"])
    batch = next(iter(data.loader()))
    assert batch.latents.shape[1:3] == (tiny_pipe.vae.config.z_dim, 1)
    # RGBA kept: the 2.1 VAE reads four channels; the cached latents are a different key from the composited ones
    spec_keys = {
        key_for_image(root / "rgba.png", (128, 128), model_identity(cfg.model), s)
        for s in ("alpha=keep", "alpha=composite:#ffffff")
    }
    assert len(spec_keys) == 2


def test_changed_caption_reembeds_one_item_and_resume(
    tmp_path, tiny_pipe, tiny_model_dir, sample_data_dir, count_encodes
):

    root = tmp_path / "brand"
    shutil.copytree(sample_data_dir / "brand", root)
    cfg = _cfg(root, tiny_model_dir, tmp_path)
    first = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert first.latents_encoded > 0
    before = dict(count_encodes)
    again = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert count_encodes == before and again.cached == again.items  # nothing recomputed
    (root / "004.txt").write_text("a qwnbrand mug, a brand new caption")
    third = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert (third.latents_encoded, third.prompts_encoded) == (0, 1)
    assert count_encodes["prompts"] == before["prompts"] + 1 and count_encodes["latents"] == before["latents"]
    # interrupted: drop the newest shard + index, as a kill before its flush would; the rerun redoes only that
    shards = sorted((Path(cfg.data.cache_dir) / "shards").glob("*.json"))
    lost = len(json.loads(shards[0].read_text())["keys"])
    shards[0].unlink()
    fourth = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert 0 < fourth.latents_encoded + fourth.prompts_encoded <= lost


NO_ENCODERS = type("P", (), {"vae": None, "text_encoder": None})()  # training from the cache alone


def test_a_run_in_a_new_output_dir_encodes_and_screens_nothing_and_still_drops_the_duplicate(
    tmp_path, tiny_pipe, tiny_model_dir, count_encodes, monkeypatch
):
    """#26 item 14: the default cache lives outside the run folder, so the run after `already holds a run` (a new
    output_dir) reuses the first run's latents, embeddings and verdicts; its duplicate is excluded as before."""
    root = tmp_path / "bad"
    make_bad_folder(root)
    first, second = (_cfg(root, tiny_model_dir, tmp_path / run) for run in ("first", "second"))
    stats = prepare(first, tiny_pipe, progress=False, log=lambda *_: None)
    skipped = {item.id for item, _ in build_training_data(first, NO_ENCODERS).skipped}
    assert "copy_of_good0.png" in skipped and "good0.png" not in skipped
    encoded, probed = dict(count_encodes), []
    monkeypatch.setattr(doctor, "probe_image", lambda *a: probed.append(a[0]) or probe_image(*a))
    data = build_training_data(second, NO_ENCODERS)  # its training alone: trusts the doctor, needs no encoder
    assert {item.id for item, _ in data.skipped} == skipped and data.uncached_entries() == 0
    printed = []
    again = prepare(second, tiny_pipe, progress=False, log=printed.append)
    assert again.items == again.cached == stats.items and (again.latents_encoded, again.prompts_encoded) == (0, 0)
    assert count_encodes == encoded and probed == []  # no encoder ran, no image was screened again
    assert printed[0].startswith("data doctor (no file changed since it ran):")


def test_verdicts_are_kept_per_data_set_and_per_settings(tmp_path, tiny_pipe, tiny_model_dir):
    """Two data sets, or one data set under other doctor limits, share the cache but never each other's verdicts."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_bad_folder(a)
    make_bad_folder(b)  # the same item names, so only the data source tells the verdicts apart
    cfg_a, cfg_b = _cfg(a, tiny_model_dir, tmp_path), _cfg(b, tiny_model_dir, tmp_path)
    prepare(cfg_a, tiny_pipe, progress=False, log=lambda *_: None)
    # under a lower data.min_side, the item A's doctor found too small is judged afresh, and trains
    smaller = _cfg(a, tiny_model_dir, tmp_path, "data.min_side=16")
    assert verdicts_dir(smaller) != verdicts_dir(cfg_a)
    assert "tiny.png" in {e.item.id for e in build_training_data(smaller, tiny_pipe).dataset.entries}
    # B's doctor run does not replace A's: A still leaves its duplicate out without checking anything again
    prepare(cfg_b, tiny_pipe, progress=False, log=lambda *_: None)
    assert verdicts_dir(cfg_a) != verdicts_dir(cfg_b)
    assert "copy_of_good0.png" in {item.id for item, _ in build_training_data(cfg_a, NO_ENCODERS).skipped}


def test_qwen_lora_cache_moves_the_default_cache(tmp_path, tiny_pipe, tiny_model_dir, sample_data_dir, monkeypatch):
    monkeypatch.setenv("QWEN_LORA_CACHE", str(tmp_path / "moved"))
    cfg = _cfg(sample_data_dir / "brand", tiny_model_dir, tmp_path)
    printed = []
    prepare(cfg, tiny_pipe, progress=False, log=printed.append)
    assert list((tmp_path / "moved" / "shards").glob("*.safetensors")) and not (tmp_path / "out").exists()
    assert str(tmp_path / "moved" / "verdicts") in printed[0]  # the doctor's line says where the cache is


def test_two_runs_repairing_the_shared_cache_at_once_both_finish(tmp_path):
    """Two runs' `prepare` can verify the shared cache together: both find a cut-short shard, and the one that moves
    it aside second finds it gone instead of failing."""
    with Cache(tmp_path, "m1", writable=True, items_per_shard=2) as cache:
        for i in range(4):
            cache.put(f"k{i}", {"latents": torch.full((1, 4, 1, 2, 2), float(i))})
    shard = sorted((tmp_path / "shards").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    first, second = Cache(tmp_path, "m1", writable=True), Cache(tmp_path, "m1", writable=True)
    assert first.verify(repair=True) == second.verify(repair=True) == {shard.name: ["k0", "k1"]}
    assert sorted(Cache(tmp_path, "m1").keys()) == ["k2", "k3"] and len(list((tmp_path / "damaged").iterdir())) == 2


def test_alpha_keep_caches_the_latents_of_the_files_own_alpha(tmp_path, tiny_pipe, tiny_model_dir):
    """`data.alpha: keep` trains on the RGBA pixels of the file: a half-transparent pixel reaches the VAE with its own
    alpha (the mode alone, RGBA, passed with the alpha inverted)."""
    root = tmp_path / "rgba"
    root.mkdir()
    rgba = np.random.default_rng(0).integers(0, 256, (128, 128, 4), dtype=np.uint8)  # at its bucket: no resize or crop
    rgba[..., 3] = np.linspace(0, 255, 128).astype(np.uint8)[None, :]  # clear -> half -> opaque, left to right
    Image.fromarray(rgba, "RGBA").save(root / "logo.png")
    (root / "logo.txt").write_text("a logo")
    cfg = _cfg(root, tiny_model_dir, tmp_path, "data.alpha=keep")
    prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)

    data = build_training_data(cfg, type("P", (), {"vae": None, "text_encoder": None})())  # the cache alone
    cached = data.dataset.sample(0, "a logo")["latents"]
    pixels = torch.from_numpy(rgba).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]  # [1, 4, 1, H, W]
    torch.testing.assert_close(cached, qmodel.encode_latents(tiny_pipe, pixels), rtol=1e-4, atol=1e-5)


def test_an_alpha_setting_re_encodes_only_the_files_that_have_alpha(tmp_path, tiny_pipe, tiny_model_dir):
    """`data.alpha=keep` or another `data.background` re-encoded every image, though an RGB file's pixels are the
    same under any alpha setting: 28 byte-identical latents twice over on the sample data."""
    root = tmp_path / "mixed"
    root.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "RGB").save(root / "photo.png")
    Image.fromarray(rng.integers(0, 256, (128, 128, 4), dtype=np.uint8), "RGBA").save(root / "logo.png")
    for name in ("photo", "logo"):
        (root / f"{name}.txt").write_text(f"a {name}")
    counts = []
    for extra in ([], ["data.alpha=keep"], ["data.background=#000000"]):
        stats = prepare(_cfg(root, tiny_model_dir, tmp_path, *extra), tiny_pipe, progress=False, log=lambda *_: None)
        counts.append(stats.latents_encoded)
    assert counts == [2, 1, 1]  # then the logo alone, once per alpha setting


def test_a_writable_cache_under_a_file_is_a_write_error_naming_its_folder(tmp_path):
    (tmp_path / "blocked").write_text("a file where data.cache_dir should be")
    shards = tmp_path / "blocked" / "cache" / "shards"
    with pytest.raises(WriteError) as e:  # was NotADirectoryError, a traceback from `data prepare`
        Cache(tmp_path / "blocked" / "cache", "m1", writable=True)
    assert describe_write_error(e.value, e.value.filename) == (
        f"could not write {shards}: a part of that path is a file, not a folder; choose a folder path and retry"
    )


def test_edit_markers_keep_their_latent_position(tmp_path, tiny_pipe, tiny_model_dir):
    """Target and same-size source share the resize and crop, so a marker stays in the same latent cell."""
    root = tmp_path / "edits"
    root.mkdir()
    h, w = 333, 517  # not bucket-shaped: forces a resize and a crop
    rows = []
    for i, (y, x) in enumerate([(150, 260), (40, 60), (300, 480)]):
        for name in ("src", "tgt"):
            a = np.full((h, w, 3), 128, np.uint8)
            a[y : y + 20, x : x + 20] = (255, 0, 0)
            if name == "tgt":
                a[:30] = (0, 0, 255)
            Image.fromarray(a).save(root / f"{i}_{name}.png")
        rows.append({"target": f"{i}_tgt.png", "instruction": "blue band on top", "sources": [f"{i}_src.png"]})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(root / "m.jsonl", tiny_model_dir, tmp_path, "data.crop=random", "data.resolution=256")
    prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)

    data = build_training_data(cfg, tiny_pipe)
    for index, entry in enumerate(data.dataset.entries):
        assert entry.sources[0] == entry.target  # one transform for both
        cells = []
        for path, t in ((entry.item.sources[0], entry.sources[0]), (entry.item.target, entry.target)):
            px = np.asarray(t.apply(open_image(path)))
            red = np.argwhere((px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 60))
            cells.append(tuple((red.mean(0) // qmodel.LATENT_PIXELS).astype(int)) if len(red) else None)
        assert cells[0] == cells[1]
        sample = data.dataset.sample(index, "blue band on top")
        assert sample["latents"].shape == sample["cond_latents"][0].shape  # same latent grid


@pytest.mark.slow
def test_two_processes_share_one_cache(tmp_path, tiny_model_dir, sample_data_dir, data_cache):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path}/out\nmodel: {{pretrained: {tiny_model_dir}, dtype: float32}}\n"
        f"data: {{path: {sample_data_dir / 'brand'}, resolution: 128, shard_size: 2}}\n"
    )
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [
        *accelerate_launch(2, "--multi_gpu"),
        "-m",
        "qwen_image_lora.cli",
        "data",
        "prepare",
        "--config",
        str(cfg),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    shards = list((data_cache / "shards").glob("*.json"))  # the default cache, shared by both processes
    ranks = {p.name.split("-r")[1][:3] for p in shards}
    assert ranks == {"000", "001"}
    c = load_config(str(cfg))

    data = build_training_data(c, type("P", (), {"vae": None, "text_encoder": None})())
    for i in range(len(data.dataset)):
        data.dataset.sample(i, data.dataset.texts_for(i)[0])  # everything is cached: no encoder needed


def test_an_older_per_run_cache_is_named_with_its_size_once_not_read(
    tmp_path, tiny_pipe, tiny_model_dir, sample_data_dir, caplog
):
    """Runs before the shared cache kept theirs in <output_dir>/cache: prepare and training say it is no longer read
    and how much it holds; a config that names that folder as its cache hears nothing."""
    cfg = _cfg(sample_data_dir, tiny_model_dir, tmp_path)
    old = Path(cfg.output_dir) / "cache"
    (old / "shards").mkdir(parents=True)
    (old / "shards" / "r0-0.safetensors").write_bytes(b"\0" * 3 * 2**20)
    printed = []
    prepare(cfg, tiny_pipe, progress=False, log=printed.append)
    notes = [line for line in printed if str(old) in line]
    assert len(notes) == 1 and "3.0 MiB" in notes[0] and "no longer read" in notes[0]
    with caplog.at_level("INFO", logger="qwen_image_lora"):
        build_training_data(cfg, NO_ENCODERS)
    assert sum(str(old) in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("INFO", logger="qwen_image_lora"):
        build_training_data(_cfg(sample_data_dir, tiny_model_dir, tmp_path, f"data.cache_dir={old}"), tiny_pipe)
    assert not any("no longer read" in r.getMessage() for r in caplog.records)


def test_the_model_part_of_a_key_follows_the_encoders_files_not_only_the_folders_name(tiny_model_dir, tmp_path):
    """A model folder whose weights were replaced in place (a newer download into the same folder) served the old
    model's latents and embeddings: the key held its name, revision and dtype only."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = load_config(None, [f"model.pretrained={model}"])
    before = model_identity(cfg.model)
    assert model_identity(cfg.model) == before  # nothing changed: the cache is reused
    (model / "transformer" / "config.json").touch()  # not an encoder: latents and embeddings stay valid
    assert model_identity(cfg.model) == before
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes() + b" ")
    assert model_identity(cfg.model) != before


def test_worker_processes_load_only_from_a_complete_cache(tmp_path, tiny_pipe, tiny_model_dir, sample_data_dir, caplog):
    """With data.num_workers > 0 each worker encoded into its own copy of the cache: nothing reached the disk (every
    run encoded again), and workers wrote shards under one name, over each other."""
    cfg = _cfg(sample_data_dir / "brand", tiny_model_dir, tmp_path, "data.num_workers=2", "data.shard_size=1")
    caplog.set_level("WARNING")
    assert build_training_data(cfg, tiny_pipe).loader().num_workers == 0
    assert "data.num_workers=2: 12 entries are not in the data cache" in caplog.text
    prepare(cfg, tiny_pipe, progress=False, log=lambda _: None)
    caplog.clear()
    data = build_training_data(cfg, tiny_pipe)
    assert data.loader().num_workers == 2 and "num_workers" not in caplog.text
