"""scripts/bench_speed.py keeps running against the current model code (a smoke run on the tiny model, no timing
asserted), a wrong DIFFUSERS_EXAMPLE_SCRIPT is refused by name before the long part starts, and the loop time that
judges our trainer against the example is read right from a TensorBoard log."""

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import qwen_image_lora

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_speed.py"
EXAMPLE = os.environ.get("DIFFUSERS_EXAMPLE_SCRIPT")
_SPEC = importlib.util.spec_from_file_location("example_speed", SCRIPT.parent / "example_speed.py")
example_speed = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(example_speed)


def _run(*args, env=None):
    env = {**os.environ, **(env or {})}
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_tiny_inference_run_prints_every_case_against_eager():
    proc = _run("--tiny", "--groups", "inference", "--steps", "1", "--rounds", "1", "--warmup", "0",
                "--resolution", "64", "--prompt-tokens", "8")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.compile(r"^\| (infer [^|]+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", re.MULTILINE)
    rows = {m.group(1): m.groups()[1:] for m in row.finditer(proc.stdout)}
    assert set(rows) == {"infer eager", "infer compile=blocks", "infer flex+blocks"}, proc.stdout
    assert rows["infer eager"][2] == "1.000"  # each case is set against eager of the same round
    assert all(float(s_per_step) > 0 for s_per_step, _, _ in rows.values())
    assert "no flex_attention backward" in proc.stdout


def test_missing_example_script_is_refused_before_anything_is_set_or_built(tmp_path, monkeypatch, capsys):
    # In-process (torch is loaded here already): the script's import path set-up is undone with the monkeypatch.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.setattr(qwen_image_lora, "__path__", list(qwen_image_lora.__path__))
    monkeypatch.delitem(sys.modules, "bench_speed", raising=False)
    bench_speed = importlib.import_module("bench_speed")
    missing = tmp_path / "train_dreambooth_lora_qwenimage21.py"
    monkeypatch.setenv("DIFFUSERS_EXAMPLE_SCRIPT", str(missing))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    threads = torch.get_num_threads()
    try:
        assert bench_speed.main(["--tiny", "--threads", str(threads + 1)]) == 2
    finally:
        changed, _ = torch.get_num_threads(), torch.set_num_threads(threads)  # the suite keeps its thread count
    out, err = capsys.readouterr()
    assert err.startswith("error: DIFFUSERS_EXAMPLE_SCRIPT=") and str(missing) in err
    assert out == ""  # not even the header: no case was built
    assert changed == threads and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


@pytest.mark.skipif(not EXAMPLE, reason="set DIFFUSERS_EXAMPLE_SCRIPT to a local copy of diffusers' example script")
def test_tiny_run_times_the_example_script_against_ours():
    proc = _run("--tiny", "--groups", "", "--rounds", "1", "--example-steps", "2", "--resolution", "64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The example's 2-step difference can come out negative on a busy machine; ours are timed directly.
    row = re.compile(r"^\| ((?:ours|example)[^|]*?) \| (-?[\d.]+) \| (-?[\d.]+)", re.MULTILINE)
    rows = {m.group(1): float(m.group(2)) for m in row.finditer(proc.stdout)}
    modes = ("eager", "compile=blocks", "compile=full", "trainer eager", "trainer compile=blocks")
    assert {"example", "example (its loop)", *(f"ours {mode}" for mode in modes)} <= set(rows), proc.stdout
    assert all(rows[f"ours {mode}"] > 0 for mode in modes)


def test_loop_seconds_is_the_mean_step_gap_of_a_loops_log_after_its_first_quarter(tmp_path):
    writer = SummaryWriter(tmp_path / "logs" / "run")
    for step in range(1, 9):  # steps 1-2 slow (start-up, compilation), then 0.5 s a step
        writer.add_scalar("loss", 1.0, global_step=step, walltime=100.0 + 0.5 * step + (10.0 if step > 2 else 0.0))
        writer.add_scalar("lr", 1e-4, global_step=step, walltime=0.0)  # other tags do not count
    writer.close()
    assert example_speed.loop_seconds(tmp_path) == pytest.approx(0.5)
    assert example_speed.loop_seconds(tmp_path / "logs" / "none") is None
