"""Training leaves out what the data doctor would, whatever state its verdicts are in (issue: a probe of the shared
cache): an exact copy is trained once with no doctor run, at other settings, added after the doctor ran, or with no
cache; a symlinked data.path finds the verdicts of its target; a later `prepare` overrides the verdicts of an earlier
one run with more processes; an unwritable cache slows training down but never fails a finished run, and a cache
path through a file is refused before any weights load."""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from qwen_image_lora import cli
from qwen_image_lora import io as qio
from qwen_image_lora import model as qmodel
from qwen_image_lora.config import CACHE_ENV, ConfigError, load_config
from qwen_image_lora.data import cache as cache_mod
from qwen_image_lora.data import screening
from qwen_image_lora.data.dataset import TrainingDataset, build_training_data
from qwen_image_lora.data.doctor import diagnose
from qwen_image_lora.data.prepare import prepare
from qwen_image_lora.data.report import past_verdicts, verdicts_dir
from qwen_image_lora.data.screening import screen_items
from qwen_image_lora.data.sources import load_items
from qwen_image_lora.io import WriteError
from qwen_image_lora.train import lora
from qwen_image_lora.train.preflight import check_before_loading

ROOT = Path(__file__).resolve().parents[1]
COPY = "zz_copy.png"
SAME = "duplicate: same image as 003.png, which is kept (the earlier file): trained once, this copy is left out"


def _cfg(root, model_dir, *extra):
    return load_config(
        None,
        [f"data.path={root}", f"model.pretrained={model_dir}", "model.dtype=float32", "data.resolution=128", *extra],
    )


def _brand(tmp_path, sample_data_dir) -> Path:
    root = tmp_path / "brand"
    shutil.copytree(sample_data_dir / "brand", root)
    return root


def _add_copy(root: Path) -> None:
    """An exact copy of 003.png (and its caption), written after it: the doctor leaves the copy out."""
    shutil.copy(root / "003.png", root / COPY)
    shutil.copy(root / "003.txt", root / Path(COPY).with_suffix(".txt"))


def _skips(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]


@pytest.mark.parametrize("state", ["no-doctor", "other-settings", "added-after-doctor", "no-cache"])
def test_an_exact_copy_trains_once_whatever_the_verdicts(state, tmp_path, sample_data_dir, tiny_model_dir, tiny_pipe,
                                                          caplog):  # fmt: skip
    root = _brand(tmp_path, sample_data_dir)
    if state != "added-after-doctor":
        _add_copy(root)
    if state in ("other-settings", "added-after-doctor"):  # the doctor ran at 128 px
        cfg = _cfg(root, tiny_model_dir)
        diagnose(cfg, tokenizer=None, contact_sheet=False).write_json(verdicts_dir(cfg) / "doctor.json")
    if state == "added-after-doctor":
        _add_copy(root)
    extra = {"other-settings": ["data.resolution=64"], "no-cache": ["data.cache_dir=null"]}.get(state, [])
    with caplog.at_level(logging.INFO):
        data = build_training_data(_cfg(root, tiny_model_dir, *extra), tiny_pipe)
    ids = [e.item.id for e in data.dataset.entries]
    assert "003.png" in ids and COPY not in ids  # was: both, silently (buckets (13 items))
    assert _skips(caplog) == [f"skipping {COPY}: {SAME}"]  # the doctor's own words


def test_the_earliest_copy_is_the_one_kept_as_the_doctor_keeps_it(tmp_path, sample_data_dir, tiny_model_dir,
                                                                   tiny_pipe, caplog):  # fmt: skip
    root = _brand(tmp_path, sample_data_dir)
    _add_copy(root)
    older = (root / "003.png").stat().st_mtime_ns - 10**9
    os.utime(root / COPY, ns=(older, older))  # copied keeping an older time (cp -p): the copy is the original
    cfg = _cfg(root, tiny_model_dir)
    doctor = diagnose(cfg, tokenizer=None, contact_sheet=False)
    with caplog.at_level(logging.WARNING):
        data = build_training_data(cfg, tiny_pipe)
    ids = [e.item.id for e in data.dataset.entries]
    assert COPY in ids and "003.png" not in ids and list(doctor.excluded) == ["003.png"]
    assert _skips(caplog) == [f"skipping 003.png: duplicate: same image as {COPY}, which is kept (the earlier file): "
                              "trained once, this copy is left out"]  # fmt: skip


@pytest.mark.parametrize("change", ["deleted", "retouched"])
def test_a_copy_the_doctor_left_out_trains_once_its_original_is_gone_or_changed(change, tmp_path, sample_data_dir,
                                                                                 tiny_model_dir, caplog):  # fmt: skip
    """The doctor's "duplicate" held for the copy while its original was deleted or retouched since: the product
    trained zero times (the doctor had said "trained once"), until the doctor ran again."""
    root = _brand(tmp_path, sample_data_dir)
    _add_copy(root)
    cfg = _cfg(root, tiny_model_dir)
    diagnose(cfg, tokenizer=None, contact_sheet=False).write_json(verdicts_dir(cfg) / "doctor.json")
    with caplog.at_level(logging.INFO):
        keep, skipped = screen_items(load_items(cfg.data), cfg, None)
    assert COPY not in [it.id for it in keep] and [(it.id, why) for it, why in skipped] == [(COPY, SAME)]
    assert _skips(caplog) == [] and "1 items left out as the data doctor" in caplog.text  # said once, by the doctor
    if change == "deleted":
        (root / "003.png").unlink()
        (root / "003.txt").unlink()
    else:
        with Image.open(root / "003.png") as im:
            im.rotate(90).save(root / "003.png")
    keep, skipped = screen_items(load_items(cfg.data), cfg, None)
    assert COPY in [it.id for it in keep] and skipped == []


def test_a_symlinked_data_path_finds_the_verdicts_of_its_target(tmp_path, sample_data_dir, tiny_model_dir):
    root = _brand(tmp_path, sample_data_dir)
    (tmp_path / "link").symlink_to(root)
    real, linked = _cfg(root, tiny_model_dir), _cfg(tmp_path / "link", tiny_model_dir)
    diagnose(real, tokenizer=None, contact_sheet=False).write_json(verdicts_dir(real) / "doctor.json")
    assert verdicts_dir(linked) == verdicts_dir(real)
    judged, _ = past_verdicts(verdicts_dir(linked), linked.data.path)
    assert len(judged) == 12


def test_a_file_gone_while_copies_are_compared_is_passed_over_and_the_rest_still_compared(
    tmp_path, sample_data_dir, tiny_model_dir, monkeypatch
):
    root = _brand(tmp_path, sample_data_dir)
    cfg = _cfg(root, tiny_model_dir)
    diagnose(cfg, tokenizer=None, contact_sheet=False).write_json(verdicts_dir(cfg) / "doctor.json")
    _add_copy(root)  # not judged: checked here, so the judged items' hashes are read to compare it with them
    items = load_items(cfg.data)
    gone = items[0].target  # judged, listed before 003.png, and deleted before its hash is read

    def content_hash(path):
        if Path(path) == gone:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        return qio.content_hash(path)

    monkeypatch.setattr(screening, "content_hash", content_hash)
    keep, skipped = screen_items(items, cfg, None)
    assert items[0].id in [it.id for it in keep]  # left to planning, which names it
    assert [(it.id, why) for it, why in skipped] == [(COPY, SAME)]  # the copy of 003.png is still found


# ------------------------------------------------------------------------------------------ prepare's verdicts


def test_a_later_prepare_with_fewer_processes_overrides_the_earlier_failures(tmp_path, sample_data_dir,
                                                                              tiny_model_dir, tiny_pipe, monkeypatch):  # fmt: skip
    cfg = _cfg(_brand(tmp_path, sample_data_dir), tiny_model_dir)
    real_sample = TrainingDataset.sample

    def flaky(self, index, text):  # a transient failure (out of memory, say) of one item on process 2 of 2
        if self.entries[index].item.id == "003.png":
            raise RuntimeError("out of memory")
        return real_sample(self, index, text)

    with monkeypatch.context() as m:
        m.setattr(TrainingDataset, "sample", flaky)
        for rank in (0, 1):
            prepare(cfg, tiny_pipe, rank=rank, world_size=2, progress=False, log=lambda *_: None)
    failed = past_verdicts(verdicts_dir(cfg), cfg.data.path)[1]
    assert "003.png" in failed
    # Training leaves it out until a prepare encodes it, even with the doctor's file gone.
    for doctor in ("kept", "removed"):
        if doctor == "removed":
            (verdicts_dir(cfg) / "doctor.json").unlink()
        held_back = build_training_data(cfg, tiny_pipe)
        assert [(it.id, why) for it, why in held_back.skipped] == [
            ("003.png", "excluded by `data prepare`: " + ", ".join(failed["003.png"]))
        ], doctor
        assert "003.png" not in [e.item.id for e in held_back.dataset.entries]
    again = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)  # one process: 003.png encodes fine
    assert again.failed == {}
    assert past_verdicts(verdicts_dir(cfg), cfg.data.path)[1] == {}  # was: prepare-r001.json kept excluding it
    assert "003.png" in [e.item.id for e in build_training_data(cfg, tiny_pipe).dataset.entries]


def test_a_prepare_failure_holds_for_its_item_not_for_the_row_that_later_takes_its_line(
    tmp_path, sample_data_dir, tiny_model_dir, tiny_pipe, monkeypatch
):
    """A manifest item's id is its line: with row 1 deleted after a prepare failed on line 4, the good image now on
    line 4 was left out "as `data prepare` excluded it", though the doctor had just called every item clean."""
    shutil.copytree(sample_data_dir / "brand", tmp_path / "brand")
    rows = [json.dumps({"image": f"brand/{i:03d}.png", "caption": f"qwnbrand {i}"}) for i in range(5)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    cfg = _cfg(manifest, tiny_model_dir)
    real_sample = TrainingDataset.sample

    def flaky(self, index, text):  # a transient failure (out of memory, say) of line 4
        if self.entries[index].item.id == "m.jsonl:4":
            raise RuntimeError("out of memory")
        return real_sample(self, index, text)

    with monkeypatch.context() as m:
        m.setattr(TrainingDataset, "sample", flaky)
        prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    assert "m.jsonl:4" in past_verdicts(verdicts_dir(cfg), cfg.data.path)[1]
    assert "m.jsonl:4" in [it.id for it, _ in build_training_data(cfg, tiny_pipe).skipped]  # as it was: still out
    manifest.write_text("\n".join(rows[1:]) + "\n")  # row 1 deleted: line 4 is now 004.png, which encodes
    for doctor in ("run since", "never run"):
        if doctor == "run since":
            diagnose(cfg, tokenizer=None, contact_sheet=False).write_json(verdicts_dir(cfg) / "doctor.json")
        else:
            (verdicts_dir(cfg) / "doctor.json").unlink()
        data = build_training_data(cfg, tiny_pipe)
        assert data.skipped == [] and len(data.dataset.entries) == 4, doctor


# ------------------------------------------------------------------------------------------ an unwritable cache


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(folder)`: every atomic write under `folder` fails as on a read-only mount (EROFS from mkstemp, which
    `atomic_path` names); tests run as root, where chmod stops nothing."""
    real = qio.atomic_path

    def make(folder, code=errno.EROFS):
        def atomic_path(path, suffix=""):
            if Path(path).is_relative_to(folder):
                raise WriteError(code, os.strerror(code), str(path))
            return real(path, suffix)

        monkeypatch.setattr(qio, "atomic_path", atomic_path)  # atomic_write_text's
        monkeypatch.setattr(cache_mod, "atomic_path", atomic_path)  # the shard writer's

    return make


def test_training_on_a_read_only_cache_warns_once_and_finishes(tmp_path, sample_data_dir, tiny_model_dir, data_cache,
                                                               read_only, caplog):  # fmt: skip
    (data_cache / "shards").mkdir()  # a prepared cache this data has no entries in
    read_only(data_cache)
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), f"model.pretrained={tiny_model_dir}",
            f"data.path={sample_data_dir / 'brand'}", f"output_dir={out}", "validation.prompts=[]",
            "validation.edits=[]", "validation.every_steps=0", "train.batch_size=1", "train.max_steps=2"]  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING):
            assert lora.main(args) == 0  # was 2: "error: could not write .../shards/...: the file system is read-only"
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    said = [r.getMessage() for r in caplog.records if str(data_cache / "shards") in r.getMessage()]
    assert said == [f"the data cache {data_cache / 'shards'} cannot be written (read-only file system): this "
                    "run keeps what it encodes in memory, and the next one encodes it again; make that folder "
                    "writable, or set data.cache_dir to a writable folder"]  # fmt: skip
    assert not list((data_cache / "shards").iterdir())


def test_an_unwritable_cache_is_kept_in_memory_but_a_full_disk_still_stops(tmp_path, read_only):
    read_only(tmp_path)
    with cache_mod.Cache(tmp_path / "c", "m", writable=True, items_per_shard=1, optional=True) as cache:
        cache.put("a", {"t": torch.ones(2)})
        cache.put("b", {"t": torch.zeros(2)})
        assert torch.equal(cache.get("a")["t"], torch.ones(2)) and cache.has("b")
    read_only(tmp_path, errno.ENOSPC)
    with pytest.raises(WriteError) as e:
        cache_mod.Cache(tmp_path / "d", "m", writable=True, items_per_shard=1, optional=True).put(
            "a", {"t": torch.ones(2)}
        )
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(WriteError):  # prepare's cache is the point of prepare: not optional
        cache_mod.Cache(tmp_path / "e", "m", writable=True, items_per_shard=1).put("a", {"t": torch.ones(2)})


def test_prepare_on_a_complete_read_only_cache_succeeds_saying_the_verdicts_were_not_recorded(
    tmp_path, sample_data_dir, tiny_model_dir, tiny_pipe, data_cache, read_only, caplog
):
    cfg = _cfg(_brand(tmp_path, sample_data_dir), tiny_model_dir)
    prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)
    read_only(data_cache)
    with caplog.at_level(logging.WARNING):
        again = prepare(cfg, tiny_pipe, progress=False, log=lambda *_: None)  # was WriteError: prepare-r000.json
    assert again.cached == again.items == 12
    target = verdicts_dir(cfg) / "prepare-r000.json"
    assert [r.getMessage() for r in caplog.records] == [
        f"prepare: could not record its verdicts: could not write {target}: the file system is read-only; choose a "
        "writable folder for it, or fix that folder's permissions, and retry"
    ]


# ------------------------------------------------------------------------------------------ a cache path through a file


def test_a_cache_path_through_a_file_is_refused_by_training_and_validate(tmp_path, tiny_model_dir, sample_data_dir,
                                                                          monkeypatch, capsys):  # fmt: skip
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocked / "cache"))
    line = (f"error: data.cache_dir ($QWEN_LORA_CACHE): could not write {blocked / 'cache'}: a part of that path is "
            "a file, not a folder; choose a folder path and retry")  # fmt: skip
    cfg = _cfg(sample_data_dir / "brand", tiny_model_dir)
    with pytest.raises(ConfigError) as e:
        check_before_loading(cfg)  # was: trained without a cache, silently
    assert e.value.line() == line
    monkeypatch.setattr(qmodel, "load_pipeline", lambda *a, **k: pytest.fail("loaded weights"))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{pretrained: {tiny_model_dir}}}\ndata: {{path: {sample_data_dir / 'brand'}}}\n")
    assert cli.main(["validate", str(config)]) == 2  # was 0: "OK"
    assert capsys.readouterr().err.strip().splitlines() == [line]
    monkeypatch.setenv(CACHE_ENV, str(blocked))  # the cache folder itself a file
    with pytest.raises(ConfigError, match="a part of that path is a file"):
        check_before_loading(_cfg(sample_data_dir / "brand", tiny_model_dir))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "fine" / "cache"))  # not there yet: made when written
    check_before_loading(_cfg(sample_data_dir / "brand", tiny_model_dir))
