"""Atomic writes (`qwen_image_lora/io.py`): the files they leave follow the umask whoever wrote the temp, and a write
that cannot happen (read-only, no permission, a file where a folder should be, a full disk) is one line naming the
path and what to do next."""

import errno
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qwen_image_lora import cli
from qwen_image_lora.cli import main
from qwen_image_lora.config import load_config
from qwen_image_lora.data import cli as data_cli
from qwen_image_lora.data.report import verdicts_dir
from qwen_image_lora.io import WriteError, atomic_dir, atomic_path, atomic_write_text, describe_write_error, iter_jsonl


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_file_the_writer_replaced_still_gets_the_umask(tmp_path, umask):
    """safetensors replaces the temp file with its own (0600) one: adapters, ComfyUI files, cache shards and
    checkpoint adapters were 0600 under umask 022."""
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "a.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        with atomic_dir(tmp_path / "checkpoint") as tmp:
            (tmp / "adapter").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "adapter" / "a.safetensors"))
    finally:
        os.umask(old)
    for path in (tmp_path / "a.safetensors", tmp_path / "checkpoint" / "adapter" / "a.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in (tmp_path / "checkpoint", tmp_path / "checkpoint" / "adapter"):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path


@pytest.mark.parametrize("code, reason", [
    (errno.EROFS, "read-only"),
    (errno.EACCES, "permission"),
    (errno.EPERM, "not permitted"),
    (errno.ENOSPC, "the disk is full"),
    (errno.EFBIG, "ulimit -f"),  # the process's file size limit, or the file system's: not free space
])  # fmt: skip
def test_a_failed_write_is_described_with_the_path_and_the_next_step(code, reason):
    wrapped = RuntimeError("safetensors: I/O error")  # a library that wraps the OSError keeps it in the chain
    wrapped.__cause__ = OSError(code, os.strerror(code))
    for error in (OSError(code, os.strerror(code)), wrapped):
        message = describe_write_error(error, "/runs/brand")
        assert message.startswith("could not write /runs/brand: ") and reason in message, message
        assert "choose" in message and "OSError" not in message, message
        assert ("free space" in message) == (code == errno.ENOSPC), message


def test_a_file_where_the_folder_should_be_is_a_write_error_naming_the_destination(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    target = tmp_path / "cache" / "sub" / "doctor.json"
    with pytest.raises(WriteError) as e:
        atomic_write_text(target, "{}")
    assert isinstance(e.value, OSError) and e.value.filename == str(target)
    message = describe_write_error(e.value, e.value.filename)
    assert str(target) in message and "not a folder" in message and "choose" in message, message
    with pytest.raises(WriteError), atomic_dir(tmp_path / "cache" / "checkpoint"):
        pass


FULL = "the disk is full (no space left on device); free space on that device (or choose another output_dir) and retry"


@pytest.mark.parametrize("writer", ["plain write", "PIL"])
def test_a_full_disk_inside_an_atomic_write_names_the_destination_not_the_temp(tmp_path, writer):
    """/dev/full fails every write with a real ENOSPC whose OSError names no file (or, from a temp, only the temp's
    random name): the CLI said 'could not write a file'."""

    def fill():
        if writer == "plain write":
            Path("/dev/full").write_text("{}")
        else:
            Image.new("RGB", (64, 64)).save("/dev/full", format="PNG")

    for context, target in ((atomic_path, tmp_path / "out" / "report.json"), (atomic_dir, tmp_path / "out" / "step-1")):
        with pytest.raises(WriteError) as e, context(target):
            fill()
        assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(target))
        assert describe_write_error(e.value, e.value.filename) == f"could not write {target}: {FULL}"
        assert list(target.parent.iterdir()) == []  # the temp is gone
    # Anything else raised inside the block is the caller's business, unchanged (a read error is not a write error).
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "out" / "x.json"):
        Path(tmp_path / "missing.txt").read_text()


def test_doctor_with_an_unwritable_cache_dir_is_one_error_line_and_exit_2(tmp_path, tiny_model_dir, capsys):

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 96), (40 * i, 90, 160)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a bottle")
    (tmp_path / "blocked").write_text("a file where data.cache_dir's parent folder should be")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{pretrained: {tiny_model_dir}}}\ndata: {{path: {images}, cache_dir: {tmp_path / 'blocked' / 'cache'}}}\n"
    )
    assert main(["data", "doctor", str(cfg)]) == 2  # was an OSError traceback naming '.doctor.json.XXXX.json' (rc 1)
    err = capsys.readouterr().err.strip().splitlines()
    target = verdicts_dir(load_config(cfg)) / "doctor.json"  # under blocked/cache
    assert err == [
        f"error: could not write {target}: a part of that path is a file, not a folder; choose a folder path and retry"
    ]


def test_a_read_only_file_system_is_named_by_the_cli(tmp_path, capsys, monkeypatch):
    """EROFS as the kernel gives it from a plain write (`data prepare`'s shard folder mkdir); a real read-only mount
    needs root, so one of our own commands stands in for the writer."""

    def read_only(args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "cache" / "shards"))

    monkeypatch.setattr(cli, "_make_sample_data", read_only)
    assert cli.main(["make-sample-data", str(tmp_path)]) == 2  # was a traceback, rc 1
    assert capsys.readouterr().err.strip() == (f"error: could not write {tmp_path / 'cache' / 'shards'}: the file system "
                                               "is read-only; choose a writable folder for it, or fix that folder's "
                                               "permissions, and retry")  # fmt: skip


def test_a_jsonl_key_given_twice_is_refused_naming_the_line(tmp_path):

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a", "seed": 1}\n\n{"prompt": "b", "seed": 1, "seed": 2}\n')
    rows = iter_jsonl(jobs)
    assert next(rows) == (f"{jobs}:1", {"prompt": "a", "seed": 1})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(jobs))}:3: 'seed' given twice; JSON keeps only the last"):
        next(rows)


def test_a_jsonl_line_python_cannot_read_is_refused_naming_it(tmp_path):
    """A 5,000-digit number and a line nested 100,000 deep were tracebacks from json.loads (int() past 4,300 digits,
    RecursionError) where every other bad line is one error naming it."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"seed": ' + "9" * 5000 + "}\n" + '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    bad = []
    assert list(iter_jsonl(jobs, bad=bad)) == []
    assert bad == [f"{jobs}:1: a number of more than 4,300 digits; no field takes one",
                   f"{jobs}:2: nested too deeply to read; no field is nested past a few levels"]  # fmt: skip


def test_the_sample_builders_keep_their_own_output_and_never_touch_a_users_folder(tmp_path, capsys):
    """Was: make-tiny-model swapped out a non-empty folder (its files gone), make-sample-data overwrote an edited
    caption, and a --seed that could not be used was ignored without a word."""
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    for command, what in (("make-tiny-model", "a model"), ("make-sample-data", "sample data")):
        for extra in ([], ["--overwrite"]):
            assert cli.main([command, str(mine), *extra]) == 2
            assert capsys.readouterr().err.strip() == (
                f"error: {mine} holds files that are not {what} (notes.txt, photos); give an empty or new folder"
            )
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "photos"] and not any((mine / "photos").iterdir())

    data = tmp_path / "data"
    assert cli.main(["make-sample-data", str(data)]) == 0
    caption = data / "brand" / "000.txt"
    caption.write_text("my own caption")
    assert cli.main(["make-sample-data", str(data)]) == 0  # the demo's re-run: kept, quietly
    assert capsys.readouterr().err == "" and caption.read_text() == "my own caption"
    assert cli.main(["make-sample-data", str(data), "--seed", "3"]) == 0
    assert capsys.readouterr().err.strip() == (
        f"note: {data} holds sample data already, kept as it is; --overwrite writes it again with --seed 3"
    )
    assert caption.read_text() == "my own caption"
    assert cli.main(["make-sample-data", str(data), "--overwrite"]) == 0
    assert caption.read_text().startswith("a qwnbrand ")

    model = tmp_path / "model"
    assert cli.main(["make-tiny-model", str(model)]) == 0
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    assert cli.main(["make-tiny-model", str(model), "--seed", "5"]) == 0
    assert "kept as it is; --overwrite writes it again with --seed 5" in capsys.readouterr().err
    assert weights.read_bytes() == before
    assert cli.main(["make-tiny-model", str(model), "--seed", "5", "--overwrite"]) == 0
    assert weights.read_bytes() != before


def test_ctrl_c_during_a_command_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Was a ~60-line traceback ending in torch/nn/... for generate, edit, layers and eval interrupted mid-render."""

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_make_sample_data", interrupted)
    assert cli.main(["make-sample-data", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "stopped (Ctrl-C) during make-sample-data; no file is left half-written\n"
    monkeypatch.setattr(data_cli, "_prepare", interrupted)  # said "during data"
    assert cli.main(["data", "prepare", "--config", "configs/demo.yaml"]) == 130
    assert capsys.readouterr().err == "stopped (Ctrl-C) during data prepare; no file is left half-written\n"
