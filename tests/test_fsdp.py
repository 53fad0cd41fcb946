"""FSDP2 through the real entry point, as 2 CPU processes on gloo (`accelerate launch --config_file
configs/accelerate/fsdp.yaml`, like the DDP test in test_train_recipe.py): after the same steps with the same seed and
data, its losses, checkpoint and final adapter match a DDP run's; a run resumed from its checkpoint ends exactly where
the uninterrupted one does; previews and the run folder are written; and every launch exits cleanly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.launch import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
LAUNCH = {"ddp": ["--multi_gpu"], "fsdp": ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]}
ADAPTER = "pytorch_lora_weights.safetensors"
CHECKPOINT = Path("checkpoints") / "step-000002"
# FSDP2 reduce-scatters where DDP all-reduces, so fp32 sums may round differently: after 4 AdamW steps at lr 5e-3 the
# adapters agree to ~1.5e-8 (weights up to ~0.26); 1e-6 leaves room for that and still catches any real divergence.
ATOL = 1e-6

pytestmark = pytest.mark.slow  # ~17 s per 2-process launch on 2 cores


# A 4-step run with EMA, LoRA dropout, a held-out loss, and a checkpoint and a preview at step 2.
RUN = (
    "data.resolution=64 train.max_steps=4 checkpoint.every_steps=2 validation.every_steps=2 "
    "validation.num_inference_steps=2 validation.edits=[] train.ema_decay=0.5 lora.dropout=0.1"
).split()


def _launch(strategy, tiny_model_dir, sample_data_dir, out, *extra) -> str:
    """`accelerate launch` of the recipe as 2 CPU processes; its stderr."""
    data = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", f"output_dir={out}"]
    cmd = [*accelerate_launch(2, *LAUNCH[strategy]), str(ROOT / "train" / "lora.py"),
           "--config", str(DEMO), *data, *RUN, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}  # fmt: skip
    env.pop("PYTEST_CURRENT_TEST", None)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr  # both ranks left cleanly, every time
    # accelerate turns an FSDP launch on CPU into DDP without a word; the recipe shards it and says so.
    assert ("FSDP2: the transformer is sharded across 2 processes" in result.stderr) == (strategy == "fsdp")
    assert result.stderr.count("INFO buckets (") == 1  # the main rank says what every rank would
    return result.stderr


@pytest.fixture(scope="module")
def runs(tiny_model_dir, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    for strategy in LAUNCH:
        _launch(strategy, tiny_model_dir, sample_data_dir, root / strategy)
    return {strategy: root / strategy for strategy in LAUNCH}


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp2_trains_the_adapter_ddp_trains(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    a, b = _losses(ddp), _losses(fsdp)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-5)

    # The checkpoint's adapter and the final (EMA) one are gathered whole from the shards, not one rank's half.
    for rel in (CHECKPOINT / "adapter" / ADAPTER, ADAPTER):
        theirs, ours = load_file(ddp / rel), load_file(fsdp / rel)
        assert all(ours[k].shape == theirs[k].shape for k in ours)
        assert _max_difference(ours, theirs) <= ATOL, rel
    final = load_file(fsdp / ADAPTER)
    assert max(v.abs().max().item() for k, v in final.items() if "lora_B" in k) > 100 * ATOL  # it trained

    meta = json.loads((fsdp / "training_metadata.json").read_text())
    assert meta["num_processes"] == 2 and len(set(meta["rank_adapter_sha256"])) == 1
    # Previews at step 2 (mid-run) and step 4 (final) ran on both ranks' shards; the pictures are DDP's.
    for step in ("step_000002", "step_000004"):
        ours, theirs = (
            np.asarray(Image.open(run / "samples" / step / "t2i_00.png"), dtype=float) for run in (fsdp, ddp)
        )
        assert np.abs(ours - theirs).mean() < 0.5, step
    assert "samples/step_000004/t2i_00.png" in (fsdp / "README.md").read_text()


def test_a_resumed_fsdp2_run_ends_where_an_uninterrupted_one_does(runs, tiny_model_dir, sample_data_dir, tmp_path):
    full, resumed = runs["fsdp"], tmp_path / "resumed"
    # What a run killed after its step-2 checkpoint leaves behind (the loss log runs ahead; the resume trims it).
    (resumed / CHECKPOINT.parent).mkdir(parents=True)
    shutil.copytree(full / CHECKPOINT, resumed / CHECKPOINT)
    for name in ("run.json", "losses.jsonl"):
        shutil.copy(full / name, resumed / name)

    stderr = _launch("fsdp", tiny_model_dir, sample_data_dir, resumed, "--resume", "latest")
    assert f"resumed from {resumed / CHECKPOINT} at step 2" in stderr
    a, b = _losses(full), _losses(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in b] == [(r["loss"], r["grad_norm"]) for r in a]  # bit-identical
    wa, wb = load_file(full / ADAPTER), load_file(resumed / ADAPTER)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # optimizer, EMA, RNG all restored


def test_a_config_error_under_a_2_process_launch_is_one_line(tiny_model_dir, sample_data_dir, tmp_path):
    """Each rank printed the same `error:` line (and its warnings and histogram) before accelerate's own report."""
    cmd = [*accelerate_launch(2, "-q", *LAUNCH["fsdp"]), str(ROOT / "train" / "lora.py"), "--config", str(DEMO),
           f"output_dir={tmp_path / 'run'}", "train.max_stepz=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "train.max_stepz" in ours[0], result.stderr[-3000:]


def test_a_2_process_checkpoint_resumed_by_1_process_says_what_changes(runs, tiny_model_dir, sample_data_dir, tmp_path):
    """The optimizer step averages half the samples at the same learning rate; the warning said only that RNG streams
    are reused."""
    resumed = tmp_path / "resumed"
    (resumed / CHECKPOINT.parent).mkdir(parents=True)
    shutil.copytree(runs["ddp"] / CHECKPOINT, resumed / CHECKPOINT)
    shutil.copy(runs["ddp"] / "run.json", resumed / "run.json")
    data = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", f"output_dir={resumed}"]
    cmd = [sys.executable, str(ROOT / "train" / "lora.py"), "--config", str(DEMO), *data, *RUN, "--resume", "latest"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = "written by 2 processes, this run has 1: an optimizer step now averages 2 samples where it averaged 4"
    assert warning in result.stderr and "at the checkpoint's learning rate (it is not rescaled)" in result.stderr
    assert [r["step"] for r in _losses(resumed)] == [3, 4]
