"""A run's own writes (issue #24, fault 2 and its smaller items): a full disk while the loss log grows, a validation
sample or a batch output is written ends the command with the one `error:` line and exit status 2 a checkpoint save
gives, naming the file (and, in training, the checkpoint that is still intact); `--resume latest` on a finished run
says so instead of retraining its last stretch."""

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from qwen_image_lora import model as qmodel
from qwen_image_lora import run_layout as layout
from qwen_image_lora.cli import main
from qwen_image_lora.io import WriteError, describe_write_error
from qwen_image_lora.train import lora
from qwen_image_lora.train.checkpoint import Checkpointer
from qwen_image_lora.train.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
EFBIG = ("the file is larger than this process (ulimit -f) or file system allows; raise `ulimit -f`, or choose an "
         "output_dir on a file system that takes larger files")  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """In-process runs each build an Accelerator; accelerate keeps process-wide singletons."""

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _args(tiny_model_dir, sample_data_dir, out, *extra):
    return [
        "--config",
        str(DEMO),
        f"model.pretrained={tiny_model_dir}",
        f"data.path={sample_data_dir / 'brand'}",
        f"output_dir={out}",
        "validation.prompts=[]",
        "validation.edits=[]",
        "validation.every_steps=0",
        "train.batch_size=1",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sample_data_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 1, 2 and 3 (copy it before changing it)."""

    out = tmp_path_factory.mktemp("trained") / "run"
    assert lora.main(_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=4")) == 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def _hashes(folder) -> dict:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in Path(folder).rglob("*")
        if p.is_file() and p.name != layout.LOCK
    }


def _dev_full() -> Path:
    full = Path("/dev/full")
    if not (full.exists() and stat.S_ISCHR(full.stat().st_mode)):
        pytest.skip("needs /dev/full (Linux), the device whose every write fails with ENOSPC")
    return full


def test_a_full_disk_under_the_loss_log_is_a_write_error_naming_it(tmp_path):
    folder = RunFolder(tmp_path)
    (tmp_path / layout.LOSSES).symlink_to(_dev_full())  # a real ENOSPC from write(), which names no file
    with pytest.raises(WriteError) as e:
        folder.append_loss({"step": 1, "loss": 0.5})
    assert describe_write_error(e.value, e.value.filename).startswith(
        f"could not write {tmp_path / layout.LOSSES}: the disk is full (no space left on device); free space"
    )


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _env():
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def test_no_room_while_logging_or_sampling_is_one_error_line_and_keeps_the_last_checkpoint(
    trained, tiny_model_dir, sample_data_dir, tmp_path
):
    """Was `run_folder.py ... append_loss ... OSError` (and `validation.py ... generate_samples ...`) and exit 1.
    `ulimit -f` stands in for a full disk (a real ENOSPC needs a full file system): the write fails the same way,
    with EFBIG, through the same error table."""
    sizes = {p.name: p.stat().st_size for p in trained.iterdir() if p.is_file()}
    room = max(sizes["config.yaml"], sizes[layout.LOSSES]) + 1024  # what the resumed run writes before step 5
    logged, runs = {}, {}
    for case in ("losses", "samples"):  # both at once (one thread each), checked after
        out = tmp_path / case
        shutil.copytree(trained, out)
        extra = []
        if case == "losses":
            # A long run's log in three rows: bigger than config.yaml, so the limit falls on step 5's new line.
            rows = [json.loads(line) for line in (out / layout.LOSSES).read_text().splitlines()][:3]
            rows[0]["note"] = "x" * room
            (out / layout.LOSSES).write_text("".join(json.dumps(r) + "\n" for r in rows))
            limit, failed = (out / layout.LOSSES).stat().st_size + 16, out / layout.LOSSES
        else:  # step 5 logs its loss, then writes its preview (~7 KB), larger than anything else the run wrote
            extra = [
                "validation.prompts=[a qwnbrand bottle]",
                "validation.every_steps=1",
                "validation.num_inference_steps=1",
                "validation.width=256",
                "validation.height=256",
            ]
            limit, failed = room, out / "samples" / "step_000005" / "t2i_00.png"
        cmd = [sys.executable, str(ROOT / "train" / "lora.py"), "--resume", "latest",
               *_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=6", *extra)]  # fmt: skip
        process = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, preexec_fn=_limit_file_size(limit))  # fmt: skip
        runs[case] = out, failed, process
    for case, (out, failed, process) in runs.items():
        _, err = process.communicate(timeout=240)
        assert process.returncode == 2, err[-3000:]
        lines = err.strip().splitlines()
        assert "Traceback" not in err and [line for line in lines if "error:" in line] == lines[-1:], lines
        last = out / "checkpoints" / "step-000004"
        assert lines[-1] == f"error: could not write {failed}: {EFBIG}; the last checkpoint {last} is intact"
        assert Checkpointer(out, 1).resolve("latest") == last  # complete and verified
        assert [p.name for p in out.rglob(".*")] == [layout.LOCK]  # no temp file left behind
        logged[case] = [r["step"] for r in RunFolder(out).read_losses()]
    assert logged == {
        "losses": [1, 2, 3],
        "samples": [1, 2, 3, 4, 5],
    }  # a half-written line is skipped (and cut on resume)


def test_resume_latest_on_a_finished_run_says_so_without_loading_weights(
    trained, tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch
):

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = _hashes(out)
    monkeypatch.setattr(qmodel, "load_pipeline", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert lora.main([*_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=4"), "--resume", "latest"]) == 0
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"run {run_id} in {out} already finished at step 4 (train.max_steps=4); its adapter is "
        f"{out / 'pytorch_lora_weights.safetensors'}. Nothing to resume; to train further, raise train.max_steps"
    )
    assert _hashes(out) == before  # nothing retrained, rewritten or claimed


# ------------------------------------------------------------------------------------------ batch outputs


def _two_jobs(tmp_path, **job) -> Path:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps({"id": f"j{i}", "prompt": f"bottle {i}", "num_inference_steps": 1, **job}) + "\n"
            for i in range(2)
        )
    )
    return jobs


def test_a_full_disk_under_the_batch_manifest_names_it(tiny_model_dir, tmp_path, capsys):

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to(_dev_full())
    argv = [
        "batch",
        str(_two_jobs(tmp_path)),
        "--output-dir",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "data.resolution=64",
        "--no-progress",
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # was "could not write a file: ..."
        f"error: could not write {out / 'manifest.jsonl'}: the disk is full (no space left on device); free space on "
        "that device (or choose another output_dir) and retry"
    )
    assert sorted(p.name for p in out.iterdir()) == ["j0.png", "manifest.jsonl"]  # stopped at the first job


def test_no_room_for_a_batch_image_stops_the_batch_naming_it(tiny_model_dir, tmp_path):
    """Was: each job 'failed' in turn (a manifest error line apiece) and exit 1, as if every input were bad."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "qwen_image_lora.cli",
        "batch",
        str(_two_jobs(tmp_path, width=256, height=256)),
        "--output-dir",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "data.resolution=64",
        "--no-progress",
    ]
    # ~7 KB images; the manifest's lines would fit.
    result = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, preexec_fn=_limit_file_size(4096)
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1] == f"error: could not write {out / 'j0.png'}: {EFBIG}"
    assert list(out.iterdir()) == []  # no image, no temp, no job marked failed
