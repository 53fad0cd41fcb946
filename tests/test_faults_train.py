"""Reliability of training runs (issue #11, items 1-5) on the tiny model: a run folder belongs to one run, a
signal ends a run with a checkpoint and no orphan, a damaged checkpoint is skipped for an intact one, a resume
keeps the books of the whole run and refuses a config that changes the maths, and a full disk says so and leaves
the previous checkpoint and adapter intact. Each case reproduces a failure of the toolkit before the fix."""

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from qwen_image_lora import model as qmodel
from qwen_image_lora import run_layout as layout
from qwen_image_lora.config import LoRAConfig, load_config, resume_fixed_fields, to_dict
from qwen_image_lora.io import atomic_dir, atomic_write_text
from qwen_image_lora.train import lora
from qwen_image_lora.train.adapter import add_lora
from qwen_image_lora.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainingProgress,
    write_manifest,
)
from qwen_image_lora.train.export import write_adapter_atomically
from qwen_image_lora.train.preemption import EXIT_PREEMPTED
from qwen_image_lora.train.resume_check import changed_fixed_fields
from qwen_image_lora.train.run_folder import RunFolder
from tests.launch import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
ADAPTER = "pytorch_lora_weights.safetensors"


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
        *extra,
    ]


def _env(**extra):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _losses(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "losses.jsonl").read_text().splitlines()]


def _progress(checkpoint) -> dict:
    return json.loads((Path(checkpoint) / "progress.json").read_text())


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _hashes(folder) -> dict:
    """Every file of a run folder by its hash, but the live trainer's lock (it stays with the folder, not the run)."""
    return {p: _sha(p) for p in Path(folder).rglob("*") if p.is_file() and p.name != layout.LOCK}


def _names(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sample_data_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 1, 2, 3 and 4 (copy it before changing it)."""

    out = tmp_path_factory.mktemp("trained") / "run"
    assert (
        lora.main(
            _args(
                tiny_model_dir,
                sample_data_dir,
                out,
                "train.max_steps=4",
                "checkpoint.every_steps=1",
                "checkpoint.keep_last=5",
            )
        )
        == 0
    )
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def _copy(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ------------------------------------------------------------------------------------------ 1. run ownership


def test_every_file_of_a_run_carries_its_run_id(trained):
    run_id = json.loads((trained / "run.json").read_text())["run_id"]
    assert run_id
    assert json.loads((trained / "training_metadata.json").read_text())["run_id"] == run_id
    assert [_progress(p)["run_id"] for p in Checkpointer(trained, 1).all()] == [run_id] * 4


def test_a_fresh_start_in_a_used_folder_stops_before_loading_weights(
    trained, tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch
):

    out = _copy(trained, tmp_path)
    before = _hashes(out)
    real_load = qmodel.load_pipeline
    monkeypatch.setattr(qmodel, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded before the check"))
    args = _args(tiny_model_dir, sample_data_dir, out, "train.max_steps=2", "train.seed=7", "checkpoint.every_steps=1")
    assert lora.main(args) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} already holds run" in err and "--resume latest" in err and "--overwrite" in err
    assert _hashes(out) == before  # nothing touched

    # --overwrite moves the old run aside, whole, and the new run starts clean.
    monkeypatch.setattr(qmodel, "load_pipeline", real_load)
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    assert lora.main([*args, "--overwrite"]) == 0
    aside = out.with_name(f"run.{old_id}")
    assert {aside / p.relative_to(out): h for p, h in before.items()} == _hashes(aside)
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    assert new_id != old_id and [r["step"] for r in _losses(out)] == [1, 2]
    assert {_progress(p)["run_id"] for p in Checkpointer(out, 1).all()} == {new_id}


def test_resuming_another_runs_checkpoint_over_a_used_folder_is_refused_untouched(
    trained, tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch
):
    """Was: `--resume OTHER/checkpoints/step-N` into a folder holding run A took it over: run.json and the metadata
    carried the other run's id, the adapter and losses were overwritten and both runs' checkpoints mixed."""
    other, used = tmp_path / "other", _copy(trained, tmp_path)
    shutil.copytree(trained, other)
    other_id = json.loads((other / "run.json").read_text())["run_id"]
    owner = uuid.uuid4().hex[:12]  # the used folder is another run's
    (used / "run.json").write_text(json.dumps({"run_id": owner, "started": 0}))
    step2 = other / "checkpoints" / "step-000002"
    before, real_load = _hashes(used), qmodel.load_pipeline
    monkeypatch.setattr(qmodel, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded before the check"))
    assert lora.main([*_args(tiny_model_dir, sample_data_dir, used, "train.max_steps=6"), "--resume", str(step2)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: output_dir {used} already holds run {owner} (checkpoints up to step-000004, a finished adapter "
        f"(pytorch_lora_weights.safetensors)), and --resume {step2} continues run {other_id}. Continue that run in "
        f"its own output_dir ({other}) or a new one; to continue this folder's run, use --resume latest"
    )
    assert _hashes(used) == before  # nothing touched
    monkeypatch.setattr(qmodel, "load_pipeline", real_load)
    fork = tmp_path / "fork"  # what the message offers: that run, continued in a new folder
    assert lora.main([*_args(tiny_model_dir, sample_data_dir, fork, "train.max_steps=3"), "--resume", str(step2)]) == 0
    assert json.loads((fork / "run.json").read_text())["run_id"] == other_id
    assert [r["step"] for r in _losses(fork)] == [3]


def test_going_back_to_an_older_checkpoint_in_the_runs_own_folder_is_refused_untouched(
    trained, tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch
):
    """Was: resuming step 2 of a finished 4-step run with max_steps=2 said 'the config wins', trained nothing and
    replaced the final adapter with step 2's, cut the loss log to 2 lines and left step-000003/4 of the old history for
    a later `--resume latest` (whose log then read steps 1, 2, 5, 6)."""
    out = _copy(trained, tmp_path)
    before, step2 = _hashes(out), out / "checkpoints" / "step-000002"
    monkeypatch.setattr(qmodel, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded before the check"))
    for folder, max_steps, said in (
        (out, 6, f"error: --resume {step2}: output_dir {out} holds later checkpoints of the run (step-000003, "
                 "step-000004), so going back would mix two histories in one folder. Continue from that checkpoint "
                 "in a new output_dir, or use --resume latest"),
        (tmp_path / "fork", 1, f"error: resume from {step2}: train.max_steps=1 is below the checkpoint's step 2; raise "
                               "train.max_steps past 2, or resume a checkpoint at or before step 1 into a new "
                               "output_dir"),  # it said "an earlier checkpoint": one in this folder is refused
    ):  # fmt: skip
        args = [*_args(tiny_model_dir, sample_data_dir, folder, f"train.max_steps={max_steps}"), "--resume", str(step2)]
        assert lora.main(args) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == said
        assert _hashes(out) == before  # nothing touched


def test_a_resume_with_another_schedule_trains_at_the_rates_its_warnings_state(trained, tiny_model_dir,
                                                                              sample_data_dir, tmp_path, caplog):  # fmt: skip
    """The warnings said both 'the checkpoint's optimizer and scheduler state wins' and 'the rate follows the new
    curve'; what trains is the config's curve at the checkpoint's base rate, and each logged rate is the one applied."""
    out, base = _copy(trained, tmp_path), load_config(ROOT / "configs" / "demo.yaml").optim.lr
    args = _args(tiny_model_dir, sample_data_dir, out, "train.max_steps=6", "optim.scheduler=cosine", "optim.lr=1e-3")
    with caplog.at_level(logging.WARNING):
        assert lora.main([*args, "--resume", "latest"]) == 0
    said = caplog.text
    assert f"the checkpoint's rate {base!r} stays the schedule's base rate; the config's is not applied" in said
    assert (
        f"step 5 trains at the checkpoint's next rate, then the rate follows the config's curve at the checkpoint's base rate {base!r}"
        in said
    )
    rates = [row["lr"] for row in _losses(out) if row["step"] > 4]
    assert rates == pytest.approx([base, base * 0.5 * (1 + math.cos(math.pi * 5 / 6))])  # constant, then cosine


def test_a_missing_init_from_is_refused_before_loading_weights(tiny_model_dir, sample_data_dir, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    monkeypatch.setattr(qmodel, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded before the check"))
    assert lora.main(_args(tiny_model_dir, sample_data_dir, tmp_path / "run", "lora.init_from=/nope/run")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: /nope/run: no such adapter file or")


def test_a_run_inside_another_runs_folder_is_refused_before_loading_weights(
    trained, tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch
):
    """output_dir=RUN/checkpoints wrote a whole second run among the first one's step folders."""
    out = _copy(trained, tmp_path)
    before = _hashes(out)
    monkeypatch.setattr(qmodel, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded before the check"))
    for inner in (out / "checkpoints", out / "checkpoints" / "new" / "deeper"):
        assert lora.main(_args(tiny_model_dir, sample_data_dir, inner, "train.max_steps=2", "--overwrite")) == 2
        owner = json.loads((out / "run.json").read_text())["run_id"]
        said = capsys.readouterr().err
        assert f"output_dir {inner} lies inside the folder of run {owner} ({out}); choose an output_dir" in said
    assert _hashes(out) == before
    # Nor may a run's folder hold another's (an --overwrite would move that run aside with its own files).
    assert lora.main(_args(tiny_model_dir, sample_data_dir, tmp_path, "train.max_steps=2", "--overwrite")) == 2
    assert f"output_dir {tmp_path} holds the folder of another run ({out})" in capsys.readouterr().err
    assert _hashes(out) == before


def test_ctrl_c_twice_ends_with_one_line_naming_the_last_checkpoint(
    trained, tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch
):
    """The second SIGINT raises KeyboardInterrupt (train/preemption.py): it printed a 40-line traceback."""
    out = _copy(trained, tmp_path)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora.LoRARecipe, "train", interrupted)
    args = _args(tiny_model_dir, sample_data_dir, out, "train.max_steps=6", "checkpoint.every_steps=1")
    assert lora.main([*args, "--resume", "latest"]) == 130
    err = capsys.readouterr().err
    last = Checkpointer(out, 1).all()[-1]
    assert err.splitlines()[-1] == (
        f"stopped: Ctrl-C twice, without a checkpoint now; the last checkpoint {last} is intact (--resume latest)"
    )
    assert "Traceback" not in err


def _importing_torch(pid: int) -> bool:
    """Whether the process has torch's library mapped: it is inside `import torch`, which the trainer starts once its
    early checks are done and SIGINT is back at the default."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it has ended
        return False


def test_ctrl_c_while_the_trainer_imports_its_libraries_ends_it_without_a_traceback(
    tmp_path, tiny_model_dir, sample_data_dir
):
    """Was an 80-line KeyboardInterrupt traceback from inside diffusers' imports (the stop handler comes later). A
    model and data that pass the trainer's early checks, so it goes on to import."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train" / "lora.py"), *_args(tiny_model_dir, sample_data_dir, tmp_path / "run")],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Inside `import torch` and the rest (several seconds): a fixed sleep sent the signal at another stage under load.
    deadline = time.monotonic() + 60
    while not _importing_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the trainer finished importing before the signal"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT  # ended by the signal, as a shell's Ctrl-C expects (status 130)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_live_run_holds_its_folder_against_a_second_trainer(
    trained, tiny_model_dir, sample_data_dir, tmp_path, capsys
):
    out = _copy(trained, tmp_path)
    before = _hashes(out)
    live = RunFolder(out)
    live.lock()  # what a running trainer holds (released when it ends, however it ends)
    try:
        for extra in (["--resume", "latest"], ["--overwrite"]):
            assert lora.main([*_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=5"), *extra]) == 2
            err = capsys.readouterr().err
            assert f"output_dir {out} is in use by a live trainer (pid {os.getpid()})" in err, err
            assert _hashes(out) == before
    finally:
        live.unlock()
    assert lora.main([*_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=5"), "--resume", "latest"]) == 0
    assert [r["step"] for r in _losses(out)] == [1, 2, 3, 4, 5]


def test_resume_latest_and_rotation_leave_another_runs_checkpoints_alone(
    trained, tiny_model_dir, sample_data_dir, tmp_path, caplog
):
    caplog.set_level("INFO")

    out = _copy(trained, tmp_path)
    # A newer checkpoint of another run in the same folder (what the old toolkit left when two runs shared it).
    foreign = out / "checkpoints" / "step-000009"
    shutil.copytree(out / "checkpoints" / "step-000003", foreign)
    progress = {**_progress(foreign), "run_id": "someone-else", "step": 9}
    (foreign / "progress.json").write_text(json.dumps(progress))
    (foreign / "manifest.json").unlink()
    write_manifest(foreign)

    with caplog.at_level("WARNING"):
        assert (
            lora.main(
                [
                    *_args(
                        tiny_model_dir,
                        sample_data_dir,
                        out,
                        "train.max_steps=6",
                        "checkpoint.every_steps=1",
                        "checkpoint.keep_last=2",
                    ),
                    "--resume",
                    "latest",
                ]
            )
            == 0
        )
    assert "step-000009: it belongs to run someone-else" in caplog.text
    assert [r["step"] for r in _losses(out)] == [1, 2, 3, 4, 5, 6]  # continued from its own last step, 4
    # Rotation kept this run's newest two and did not touch the other run's.
    assert _names(out / "checkpoints") == ["step-000005", "step-000006", "step-000009"]
    assert _progress(foreign)["run_id"] == "someone-else"


# ------------------------------------------------------------------------------------------ 2. preemption


def _train_cmd(tiny_model_dir, sample_data_dir, out, *extra):
    # Accumulation, EMA, LoRA dropout and caption dropout all draw randomness that a resume must restore.
    return [
        sys.executable,
        str(ROOT / "train" / "lora.py"),
        *_args(
            tiny_model_dir,
            sample_data_dir,
            out,
            "train.max_steps=10",
            "checkpoint.every_steps=100",
            "train.gradient_accumulation_steps=2",
            "train.ema_decay=0.9",
            "lora.dropout=0.1",
            "data.caption_dropout=0.3",
            *extra,
        ),
    ]


def _wait_for_steps(out, n, process, timeout=120):
    deadline = time.time() + timeout
    while not ((Path(out) / "losses.jsonl").is_file() and len(_losses(out)) >= n):
        assert process.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.02)


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(
    tiny_model_dir, sample_data_dir, tmp_path
):

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    first = subprocess.Popen(
        _train_cmd(tiny_model_dir, sample_data_dir, full),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        _train_cmd(tiny_model_dir, sample_data_dir, stopped),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_steps(stopped, 3, victim)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == EXIT_PREEMPTED, err[-3000:]
    done = _losses(stopped)[-1]["step"]
    assert 3 <= done < 10 and "--resume latest" in err.splitlines()[-1]
    # One checkpoint, at the step the run stopped after, although checkpoint.every_steps=100.
    assert [_progress(p)["step"] for p in Checkpointer(stopped, 1).all()] == [done]
    assert not (stopped / ADAPTER).exists()
    assert first.wait(timeout=240) == 0, first.stderr.read()[-3000:]

    resumed = subprocess.run(
        [*_train_cmd(tiny_model_dir, sample_data_dir, stopped), "--resume", "latest"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _losses(full), _losses(stopped)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical, step for step
    wa, wb = (load_file(d / ADAPTER) for d in (full, stopped))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # EMA'd final adapter too


def test_a_signal_after_the_console_reader_has_gone_still_ends_with_a_checkpoint(
    tiny_model_dir, sample_data_dir, tmp_path
):
    """`python train/lora.py ... 2>&1 | tee log` and Ctrl-C (tee dies too), or a killed `accelerate launch` (which
    pipes the trainer's stderr): the trainer's next line got EPIPE and it died with status 1 and no checkpoint."""
    out = tmp_path / "teed"
    victim = subprocess.Popen(_train_cmd(tiny_model_dir, sample_data_dir, out, "train.max_steps=100000"), cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    _wait_for_steps(out, 2, victim)
    victim.stdout.close()
    victim.stderr.close()  # the reader is gone
    victim.send_signal(signal.SIGINT)
    assert victim.wait(timeout=120) == EXIT_PREEMPTED
    done = _losses(out)[-1]["step"]
    assert [_progress(p)["step"] for p in Checkpointer(out, 1).all()] == [done]
    assert Checkpointer(out, 1).resolve("latest").name == f"step-{done:06d}"  # complete and verified


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_to_accelerate_launch_stops_the_trainer_with_a_checkpoint(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "launched"
    cmd = [
        *accelerate_launch(1),
        *_train_cmd(tiny_model_dir, sample_data_dir, out, "train.max_steps=100000")[1:],
    ]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_steps(out, 2, launcher)
    (trainer,) = _children(launcher.pid)
    try:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        deadline = time.time() + 90
        while _alive(trainer) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(trainer), "the trainer outlived its launcher"
    finally:
        if _alive(trainer):
            os.kill(trainer, signal.SIGKILL)
    done = _losses(out)[-1]["step"]
    assert [_progress(p)["step"] for p in Checkpointer(out, 1).all()] == [done]
    assert Checkpointer(out, 1).resolve("latest").name == f"step-{done:06d}"  # complete and verified


@pytest.mark.slow  # ~40 s: two processes, each importing torch/diffusers
def test_sigterm_to_one_ddp_rank_stops_both_at_the_same_step_with_one_checkpoint(
    tiny_model_dir, sample_data_dir, tmp_path
):
    out = tmp_path / "ddp"
    cmd = [
        *accelerate_launch(2, "--multi_gpu"),
        *_train_cmd(tiny_model_dir, sample_data_dir, out, "train.max_steps=100000")[1:],
    ]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:  # a file, not a pipe nobody reads while the ranks log
        launcher = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(ACCELERATE_USE_CPU="1"), stdout=subprocess.DEVNULL, stderr=err
        )
    _wait_for_steps(out, 2, launcher, timeout=240)
    workers = _children(launcher.pid)
    rank = {
        int(
            dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)["RANK"]
        ): pid
        for pid in workers
    }
    try:
        os.kill(rank[1], signal.SIGTERM)  # only the second rank hears it
        launcher.wait(timeout=120)
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    done = _losses(out)[-1]["step"]
    checkpoints = Checkpointer(out, 1).all()
    assert [_progress(p)["step"] for p in checkpoints] == [done] and _progress(checkpoints[0])["num_processes"] == 2
    assert Checkpointer(out, 1).resolve("latest") == checkpoints[0]
    # One last word, the main rank's, naming the checkpoint (rank 1 once said "checkpoint None written", and every rank
    # used to say its own line).
    said = [line for line in log.read_text().splitlines() if line.startswith("stopped by")]
    assert said == [
        f"stopped by a signal on another rank after step {done} of 100000; checkpoint {checkpoints[0]} written; "
        "continue with --resume latest"
    ], said


# ------------------------------------------------------------------------------------------ 3. verified checkpoints


@pytest.mark.parametrize("damage", ["truncated adapter", "2 KB overwritten"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(
    damage, trained, tiny_model_dir, sample_data_dir, tmp_path, caplog
):
    out = _copy(trained, tmp_path)
    expected = _losses(out)
    newest = out / "checkpoints" / "step-000004"  # the last step's
    if damage == "truncated adapter":
        path = newest / "adapter" / ADAPTER
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # the same size, 2 KB of the adapter's tensor data (after the safetensors header) replaced
        path = newest / "adapter" / ADAPTER
        data = bytearray(path.read_bytes())
        start = 8 + int.from_bytes(data[:8], "little") + 64
        data[start : start + 2048] = os.urandom(2048)
        path.write_bytes(bytes(data))
    with caplog.at_level("INFO"):  # one step further than the finished run (resuming it as it was is refused)
        assert (
            lora.main(
                [
                    *_args(
                        tiny_model_dir,
                        sample_data_dir,
                        out,
                        "train.max_steps=5",
                        "checkpoint.every_steps=1",
                        "checkpoint.keep_last=5",
                    ),
                    "--resume",
                    "latest",
                ]
            )
            == 0
        )
    assert f"skipping damaged checkpoint {newest}" in caplog.text
    assert ("truncated" if damage == "truncated adapter" else "does not match its sha256") in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step-000003'} at step 3" in caplog.text
    losses = [r["loss"] for r in _losses(out)]
    assert len(losses) == 5 and losses[:4] == [r["loss"] for r in expected]  # step 4 retrained to the same loss


class _Planted:
    """What a pickle can hold besides tensors: here, a call that leaves a file behind when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_holding_code_is_refused_and_runs_nothing(trained, tiny_model_dir, sample_data_dir, tmp_path,
                                                               capsys):  # fmt: skip
    """training_state.pt was loaded with weights_only=False: a checkpoint someone handed over ran its code on resume
    (the manifest, rewritten with it, proves completeness, not origin)."""
    out, marker = _copy(trained, tmp_path), tmp_path / "ran"
    newest = out / "checkpoints" / "step-000004"
    state = torch.load(newest / "training_state.pt", weights_only=False)
    torch.save({**state, "guards": {**state["guards"], "note": _Planted(marker)}}, newest / "training_state.pt")
    write_manifest(newest)
    argv = [*_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=5", "checkpoint.every_steps=1"), "--resume",
            "latest"]  # fmt: skip
    assert lora.main(argv) == 2 and not marker.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: resume from {newest}: training_state.pt holds objects other than tensors and plain values, which "
        "this toolkit never writes (loading them could run code); resume from a checkpoint this toolkit wrote"
    )


EDITS = {
    "a list of names": list,
    "a number per file": lambda files: {name: 5 for name in files},
    "no size": lambda files: {name: {"sha256": e["sha256"]} for name, e in files.items()},
    "a size in quotes": lambda files: {name: {**e, "size": str(e["size"])} for name, e in files.items()},
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_manifest_of_another_shape_is_a_damaged_checkpoint(trained, tmp_path, edit, caplog):
    """A hand-edited manifest was a traceback on resume (AttributeError, TypeError, KeyError), or "has 37328 bytes,
    the manifest says 37328"."""
    out = _copy(trained, tmp_path)
    newest = out / "checkpoints" / "step-000004"
    files = json.loads((newest / "manifest.json").read_text())["files"]
    (newest / "manifest.json").write_text(json.dumps({"files": EDITS[edit](files)}))
    with caplog.at_level("WARNING"):
        assert Checkpointer(out, 5).resolve("latest") == out / "checkpoints" / "step-000003"
    assert "manifest.json is not a list of files with their size and sha256" in caplog.text


def test_resume_with_overwrite_is_refused_naming_both(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    """It was accepted: "nothing to resume", rc 0, with the folder left as it was."""
    with pytest.raises(SystemExit) as e:
        lora.main([*_args(tiny_model_dir, sample_data_dir, tmp_path / "run"), "--resume", "latest", "--overwrite"])
    assert e.value.code == 2 and "--resume continues a run and --overwrite starts a new one" in capsys.readouterr().err


def test_a_finished_run_trained_further_continues_exactly_where_it_ended(
    tiny_model_dir, sample_data_dir, tmp_path, caplog
):
    """No checkpoint was written at the last step, so raising train.max_steps retrained from the newest mid-run
    checkpoint (here: from scratch, with none). The last step's checkpoint makes 3 + 2 steps equal 5."""
    caplog.set_level("INFO")
    runs = {}
    for name, steps in (("extended", [3, 5]), ("straight", [5])):
        out = tmp_path / name
        for i, max_steps in enumerate(steps):
            args = _args(
                tiny_model_dir, sample_data_dir, out, f"train.max_steps={max_steps}", "checkpoint.every_steps=100"
            )
            assert lora.main([*args, *(["--resume", "latest"] if i else [])]) == 0
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        runs[name] = _losses(out)
    assert f"resumed from {tmp_path / 'extended' / 'checkpoints' / 'step-000003'} at step 3" in caplog.text
    assert runs["extended"] == runs["straight"]  # steps 1-3 once each, then 4-5 as the uninterrupted run had them
    # The two fresh starts are told their only checkpoint is the last step's; the resumed run has its checkpoint.
    assert caplog.text.count("the only checkpoint will be the last step's") == 2


def test_leftovers_of_a_killed_save_are_removed_and_a_half_written_loss_line_is_dropped(
    trained, tiny_model_dir, sample_data_dir, tmp_path, caplog
):
    caplog.set_level("INFO")
    out = _copy(trained, tmp_path)
    expected = _losses(out)
    leftovers = [out / "checkpoints" / ".step-000004.k1ll3d", out / ".adapter.k1ll3d"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "partial.bin").write_bytes(b"\0" * 100)
    (out / ".training_metadata.json.k1ll3d.json").write_text("{")
    with open(out / "losses.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # killed mid-append
    assert (
        lora.main(
            [
                *_args(
                    tiny_model_dir,
                    sample_data_dir,
                    out,
                    "train.max_steps=6",
                    "checkpoint.every_steps=1",
                    "checkpoint.keep_last=5",
                ),
                "--resume",
                "latest",
            ]
        )
        == 0
    )
    assert not any(p.exists() for p in leftovers) and not list(out.glob(".training_metadata.json.*"))
    rows = _losses(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:3] == expected[:3]  # the steps up to the checkpoint kept as they were
    meta = json.loads((out / "training_metadata.json").read_text())
    losses = [r["loss"] for r in rows]
    # Halves of a run shorter than two windows: the whole 6 steps against themselves said nothing
    assert meta["first_loss"] == pytest.approx(sum(losses[:3]) / 3) and meta["final_loss"] == pytest.approx(
        sum(losses[3:]) / 3
    )
    assert "(mean of steps 1-3)" in caplog.text and "(steps 4-6)" in caplog.text  # it said "10" of 6
    assert meta["run_id"] == json.loads((trained / "run.json").read_text())["run_id"]  # the same run, continued


def test_resume_latest_without_a_checkpoint_says_to_drop_resume(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    assert lora.main([*_args(tiny_model_dir, sample_data_dir, tmp_path / "empty"), "--resume", "latest"]) == 2
    assert "drop --resume" in capsys.readouterr().err


def test_resume_latest_with_only_damaged_checkpoints_says_what_starts_over(tmp_path):
    """It said "drop --resume", and the run without it was refused: "add --resume latest"."""
    damaged = tmp_path / "checkpoints" / "step-000010"
    damaged.mkdir(parents=True)
    (damaged / "progress.json").write_text("{}")  # no manifest: never completed
    with pytest.raises(CheckpointError) as refused:
        Checkpointer(tmp_path, 1).resolve("latest")
    assert str(refused.value).endswith(
        "to start over, add --overwrite instead (the run is moved aside, nothing is deleted) or choose another "
        "output_dir"
    )
    assert "step-000010" in str(refused.value)


# ------------------------------------------------------------------------------------------ 4. config changes


def test_a_resume_that_changes_the_maths_is_an_error_naming_the_fields(
    trained, tiny_model_dir, sample_data_dir, tmp_path, capsys
):
    out = _copy(trained, tmp_path)
    changes = ["lora.alpha=3", "train.gradient_accumulation_steps=2", "data.caption_dropout=0.2", "train.ema_decay=0.5"]
    args = [*_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=5", *changes), "--resume", "latest"]
    assert lora.main(args) == 2
    err = capsys.readouterr().err
    for name in ("lora.alpha", "train.gradient_accumulation_steps", "data.caption_dropout", "train.ema_decay"):
        assert name in err
    assert "--allow-config-change" in err and [r["step"] for r in _losses(out)] == [1, 2, 3, 4]
    assert lora.main([*args, "--allow-config-change"]) == 0
    assert [r["step"] for r in _losses(out)] == [1, 2, 3, 4, 5]


def test_no_resume_changes_the_adapters_shape(trained, tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch):
    """Was allowed by --allow-config-change, then failed on the checkpoint's adapter after the model had loaded:
    'adapter weight ...lora_A.weight: shape (4, 16) in the file, (2, 16) here'."""
    out = _copy(trained, tmp_path)
    before = _hashes(out)
    monkeypatch.setattr(qmodel, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded before the check"))
    rank = load_config(out / "config.yaml").lora.rank
    args = _args(tiny_model_dir, sample_data_dir, out, "train.max_steps=5", f"lora.rank={rank // 2}")
    assert lora.main([*args, "--resume", "latest", "--allow-config-change"]) == 2
    last = Checkpointer(out, 1).all()[-1]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: resume from {last}: lora.rank: {rank} -> {rank // 2} changes the adapter's shape, which no resume "
        "can do (not even with --allow-config-change). Set it back, or start a new run in a new output_dir"
    )
    kept = {p: h for p, h in before.items() if p.name != "run.json"}  # run.json: the same run, a new start time
    assert {p: h for p, h in _hashes(out).items() if p.name != "run.json"} == kept


def test_the_schema_decides_what_a_resume_may_change():

    base = to_dict(load_config(None))
    changed = to_dict(
        load_config(
            None,
            [
                "lora.use_rslora=true",
                "data.resolution=512",
                "model.dtype=float32",
                "validation.held_out_fraction=0.1",
                "train.max_steps=5",
                "data.num_workers=2",
                "checkpoint.keep_last=9",
                "model.compile=blocks",
                "model.attention_backend=_native_flash",
            ],
        )
    )
    assert changed_fixed_fields(base, changed) == [
        "model.dtype: 'bfloat16' -> 'float32'",
        "data.resolution: 1024 -> 512",
        "lora.use_rslora: False -> True",
        "validation.held_out_fraction: 0.0 -> 0.1",
    ]
    fixed = set(resume_fixed_fields())
    assert {"lora", "model.pretrained", "model.revision", "model.dtype", "train.batch_size", "train.ema_decay"} <= fixed
    # How the transformer runs is not what it computes: a resume may switch compile or attention.
    assert not {"model", "model.compile", "model.attention", "model.attention_backend"} & fixed


# ------------------------------------------------------------------------------------------ 5. disk full


def test_a_full_disk_mid_save_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)

    def write_state(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / ADAPTER).write_bytes(b"w")
        (folder / "training_state.pt").write_bytes(b"s")

    ck.save(TrainingProgress(1, 0, 10, 0, 1, run_id="r"), write_state, {})

    def disk_full(folder):
        (folder / "training_state.pt").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError) as e:
        ck.save(TrainingProgress(2, 0, 10, 0, 2, run_id="r"), disk_full, {})
    assert "the disk is full" in str(e.value) and str(ck.path_for(2)) in str(e.value)
    assert f"the previous checkpoint {ck.path_for(1)} is intact" in str(e.value)
    assert _names(tmp_path / "checkpoints") == ["step-000001"]
    assert ck.resolve("latest") == ck.path_for(1)


def test_an_unwritable_output_dir_is_one_error_line_before_any_weights_load(
    tiny_model_dir, sample_data_dir, tmp_path, capsys
):
    (tmp_path / "blocked").write_text("a file where output_dir's parent folder should be")  # read-only needs root
    out = tmp_path / "blocked" / "run"
    assert lora.main(_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=1")) == 2  # was a traceback, rc 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last
        == f"error: output_dir: could not write {out}: a part of that path is a file, not a folder; choose a folder path and retry"
    )


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_running_out_of_space_in_a_real_run_names_the_path_and_loses_nothing(
    trained, tiny_model_dir, sample_data_dir, tmp_path
):
    limit = (trained / ADAPTER).stat().st_size // 2  # room for the logs and configs, not for weights
    base = [sys.executable, str(ROOT / "train" / "lora.py"), "--resume", "latest"]
    # A checkpoint at every step, then only the last step's (written before the final adapter); both at once, each
    # in its own copy of the run (one thread each).
    runs = {}
    for every in (1, 100):
        out = tmp_path / f"every-{every}"
        shutil.copytree(trained, out)
        cmd = [*base, *_args(tiny_model_dir, sample_data_dir, out, "train.max_steps=5", f"checkpoint.every_steps={every}",
                             "checkpoint.keep_last=5")]  # fmt: skip
        kept = {p: _sha(p) for p in [out / ADAPTER, out / "training_metadata.json", out / "README.md"]}
        runs[out] = kept, subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           text=True, preexec_fn=_limit_file_size(limit))  # fmt: skip
    for out, (kept, process) in runs.items():
        _, err = process.communicate(timeout=240)
        assert process.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error:") and "larger than this process (ulimit -f)" in last, last
        assert "step-000005" in last and "Traceback" not in err
        assert {p: _sha(p) for p in kept} == kept
        assert Checkpointer(out, 1).resolve("latest").name == "step-000004"
        assert [p.name for p in out.glob(".*")] == [layout.LOCK] and not list((out / "checkpoints").glob(".*"))


# ------------------------------------------------------------------------------------------ under accelerate, umask


def test_a_data_error_under_accelerate_launch_is_one_line_without_our_traceback(
    tiny_model_dir, sample_data_dir, tmp_path
):
    cmd = [
        *accelerate_launch(1),
        str(ROOT / "train" / "lora.py"),
        *_args(tiny_model_dir, sample_data_dir, tmp_path / "out", f"data.path={tmp_path / 'nowhere'}"),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    ours = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(ours) == 1 and f"{tmp_path / 'nowhere'} does not exist" in lines[ours[0]], result.stderr[-3000:]
    assert not any("Traceback" in line for line in lines[: ours[0]])  # nothing of ours before it
    # After it, accelerate's own report only (its message quotes our command line, but no frame of ours).
    ours_after = [
        line
        for line in lines[ours[0] + 1 :]
        if line.strip().startswith("File") and str(ROOT) in line and "site-packages" not in line
    ]  # the venv may live inside the checkout (CI's does)
    assert not ours_after


def test_atomic_writes_follow_the_umask(tmp_path):
    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            atomic_write_text(tmp_path / f"{umask}.json", "{}")
            with atomic_dir(tmp_path / f"folder{umask}") as tmp:
                (tmp / "x").write_text("x")
        finally:
            os.umask(old)
        assert (tmp_path / f"{umask}.json").stat().st_mode & 0o777 == 0o666 & ~umask
        assert (tmp_path / f"folder{umask}").stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_runs_adapter_follows_the_umask(tiny_model_dir, tmp_path):
    """The final adapter came out 0600 (safetensors' own mode) where every other file of the run was 0644."""
    transformer = qmodel.load_transformer(str(tiny_model_dir), torch.float32)
    add_lora(transformer, LoRAConfig(rank=2, targets="attention"))
    old = os.umask(0o022)
    try:
        written = write_adapter_atomically(transformer, tmp_path)
    finally:
        os.umask(old)
    assert written.stat().st_mode & 0o777 == 0o644 and [p.name for p in tmp_path.iterdir()] == [written.name]
