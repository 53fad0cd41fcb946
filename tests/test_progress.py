"""Long work talks when stderr is not a terminal: periodic progress lines (`qwen_image_lora/progress.py`) from
training, data prepare and (in their own test modules) batch and eval."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from qwen_image_lora import progress as progress_module
from qwen_image_lora.config import load_config
from qwen_image_lora.data.prepare import prepare
from qwen_image_lora.progress import LineProgress
from tests.launch import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]


def test_a_slow_item_reads_as_seconds_per_item(capsys, monkeypatch):
    """A fast loop read `2.31e-06 s/item`: items/s below 10 ms an item, seconds per item above."""
    clock = iter(range(0, 1000, 2))  # every reading 2 s after the last
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    bar = LineProgress(2, desc="slow", unit="item", interval=3600)
    bar.update(2)
    bar.close()
    assert re.search(r"\| [\d.]+ s/item, ETA 0:00:00$", capsys.readouterr().err.strip())


def test_skipped_items_count_towards_the_total_but_not_the_rate(monkeypatch):
    """A batch rerun's finished jobs, or refused ones, took no work: counted in the rate they made it read thousands
    of images a second and the ETA far too short."""
    clock = iter(range(0, 1000, 2))  # every reading 2 s after the last
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    bar = LineProgress(10, desc="batch", unit="img", interval=3600)
    bar.skip(5)
    assert bar._line() == "batch 5/10 (50%)"
    bar.update(1)
    assert bar._line().endswith("| 6 s/img, ETA 0:00:24")  # one image, 6 s of the clock after the start; 4 left
    terminal = progress_module._TerminalBar(total=10, desc="batch", unit="img", file=io.StringIO(), mininterval=0)
    terminal.skip(5)
    terminal.last_print_t -= 4  # the next image, 4 s of work after the skipped ones
    terminal.update(1)
    assert "0.25img/s" in str(terminal) or "4.00s/img" in str(terminal), str(terminal)
    terminal.close()


def test_line_progress_prints_at_most_once_per_interval_and_once_at_the_end(capsys):
    bar = LineProgress(5, desc="work", unit="item", interval=3600)
    for _ in range(5):
        bar.update(1)
    assert capsys.readouterr().err == ""  # nothing within the interval
    bar.close()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.split()[1:4] == ["work", "5/5", "(100%)"] and re.search(r"\| \d+ items/s, ETA 0:00:00$", line), line
    quiet = LineProgress(5, desc="off", enabled=False, interval=0)
    quiet.update(5)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_line_progress_takes_tqdms_refresh_flag_and_prints_only_the_values(capsys):
    bar = LineProgress(2, desc="steps", unit="step", interval=0)
    bar.set_postfix(loss="0.5000", refresh=False)  # the recipe leaves the drawing to update()
    bar.update(1)
    (line,) = capsys.readouterr().err.splitlines()
    assert "loss=0.5000" in line and "refresh" not in line


def test_training_prints_step_loss_and_eta_lines_into_a_pipe(tiny_model_dir, sample_data_dir, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "train" / "lora.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"model.pretrained={tiny_model_dir}",
        f"data.path={sample_data_dir / 'brand'}",
        f"output_dir={tmp_path}",
        "train.max_steps=3",
        "validation.prompts=[]",
        "validation.edits=[]",
        "validation.held_out_fraction=0",
        "checkpoint.every_steps=100",
        "data.resolution=64",
    ]
    env = {**os.environ, "QWEN_LORA_PROGRESS_SECONDS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if " steps " in line and "loss=" in line]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"], proc.stderr[-3000:]
    assert all(re.search(r"\| (\d+ steps/s|[\d.]+ s/step), ETA", line) for line in lines) and "\r" not in proc.stderr


def test_prepare_prints_progress_lines(tiny_pipe, sample_data_dir, tmp_path, capsys, monkeypatch):

    monkeypatch.setenv("QWEN_LORA_PROGRESS_SECONDS", "0")
    cfg = load_config(
        None, [f"data.path={sample_data_dir / 'brand'}", f"data.cache_dir={tmp_path}", "data.resolution=64"]
    )
    stats = prepare(cfg, tiny_pipe, log=lambda _: None)
    lines = [line for line in capsys.readouterr().err.splitlines() if " prepare " in line]
    assert [line.split()[2] for line in lines] == [f"{i}/{stats.items}" for i in range(1, stats.items + 1)]
    prepare(cfg, tiny_pipe, log=lambda _: None)  # all cached now: no work, so no rate (it read "2000 items/s")
    lines = [line for line in capsys.readouterr().err.splitlines() if " prepare " in line]
    assert len(lines) == stats.items and not any("|" in line for line in lines), lines


def test_under_accelerate_launch_in_a_terminal_training_draws_a_live_bar(tiny_model_dir, sample_data_dir, tmp_path):
    """accelerate launch (1.16+) pipes its child's stderr and copies it onto its own: with the launcher on a
    terminal the trainer draws tqdm's bar (carriage returns), not a line per 30 s."""
    primary, secondary = pty.openpty()
    cmd = [
        *accelerate_launch(1),
        "--num_cpu_threads_per_process",
        "1",
        str(ROOT / "train" / "lora.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"model.pretrained={tiny_model_dir}",
        f"data.path={sample_data_dir / 'brand'}",
        f"output_dir={tmp_path}",
        "train.max_steps=3",
        "validation.prompts=[]",
        "validation.edits=[]",
        "validation.held_out_fraction=0",
        "checkpoint.every_steps=100",
        "data.resolution=64",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary
    )
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: every writer of the terminal has closed it
            break
        if not chunk:
            break
        screen += chunk
    os.close(primary)
    assert proc.wait(timeout=300) == 0, screen[-3000:]
    text = screen.decode(errors="replace")
    assert "\r" in text and "steps: 100%" in text and "3/3" in text, text[-3000:]


def test_log_lines_while_a_terminal_bar_is_open_start_on_a_line_of_their_own(monkeypatch, capsys):
    """They were printed right after the bar: `...| 3/8 [00:00<00:01, loss=3.4590]01:32:50 INFO saved checkpoint`."""
    monkeypatch.setattr(progress_module, "stderr_reaches_terminal", lambda: True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.root.addHandler(handler)  # as the commands' basicConfig
    log = logging.getLogger("qwen_image_lora.bar-test")
    try:
        bar = progress_module.progress_bar(3, desc="steps", unit="step")
        for step in range(3):
            bar.set_postfix(loss="1.0", refresh=False)
            bar.update(1)
            log.warning("saved checkpoint %d", step)
        bar.close()
        log.warning("after the bar")
    finally:
        logging.root.removeHandler(handler)
    err = capsys.readouterr().err
    for line in [f"WARNING saved checkpoint {step}" for step in range(3)] + ["WARNING after the bar"]:
        before = err[: err.index(line)]
        assert before.endswith(("\r", "\n")), repr(before[-80:])  # the bar cleared (or ended) first
