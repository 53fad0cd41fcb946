"""Checkpoint folders: atomic writes that fail loudly, rotation, `latest`, RNG capture, config-mismatch warnings,
guards and EMA state round trips."""

import json
import random

import numpy as np
import pytest
import torch

from qwen_image_lora.config import TrainConfig, load_config, to_dict
from qwen_image_lora.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainingProgress,
    capture_rng_state,
    restore_rng_state,
)
from qwen_image_lora.train.guards import Guards, TrainingStopped
from qwen_image_lora.train.optim import LoRAEMA
from qwen_image_lora.train.resume_check import compare_config
from qwen_image_lora.train.run_folder import RunFolder, RunFolderInUse


def _progress(step):
    return TrainingProgress(step=step, seed=0, max_steps=10, epoch=1, position=step)


def _writer(state):
    def write_state(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
        torch.save(state, folder / "training_state.pt")

    return write_state


def test_save_rotates_and_finds_latest(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (5, 10, 15):
        ck.save(_progress(step), _writer({"optimizer": {"x": torch.ones(2)}}), {"train": {"seed": 0}})
    assert [p.name for p in ck.all()] == ["step-000010", "step-000015"]
    assert ck.resolve("latest") == ck.path_for(15)
    progress, config = Checkpointer.peek(ck.resolve("latest"))
    state = torch.load(ck.path_for(15) / "training_state.pt")
    assert progress == _progress(15) and torch.equal(state["optimizer"]["x"], torch.ones(2))
    assert config == {"train": {"seed": 0}}


def test_a_failed_save_raises_and_leaves_nothing_behind(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(_progress(1), _writer({}), {})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="checkpoint .*step-000002.*the disk is full"):
        ck.save(_progress(2), _writer({}), {})
    # No partial checkpoint, no temp folder, and the previous checkpoint is intact.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert ck.resolve("latest") == ck.path_for(1)


def test_resume_errors_are_clear(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=1)
    with pytest.raises(CheckpointError, match="no checkpoint under .*drop --resume"):
        ck.resolve("latest")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        ck.resolve(str(tmp_path))
    ck.save(_progress(1), _writer({}), {})
    missing = tmp_path / "checkpoints" / "step-000999"  # said "not a checkpoint folder (no progress.json)"
    with pytest.raises(
        CheckpointError, match=rf"step-000999: no such folder; checkpoints of {tmp_path}: .*step-000001"
    ):
        ck.resolve(str(missing))
    with pytest.raises(CheckpointError, match=rf"nope: no such folder; checkpoints of {tmp_path}: .*step-000001"):
        ck.resolve(str(tmp_path.parent / "nope"))  # not inside a run: this output_dir's are listed


def test_rng_states_round_trip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_a_resume_into_another_wandb_project_says_the_history_splits():
    saved = to_dict(load_config(None, ["tracking.backend=wandb"]))
    moved = to_dict(load_config(None, ["tracking.backend=wandb", "tracking.project=other"]))
    (warning,) = compare_config(saved, moved, TrainingProgress(50, 1, 100, 0, 0))
    assert warning.startswith("tracking.project: 'qwen-image-lora' in the checkpoint, 'other' in the config")
    assert "history is split" in warning
    offline = to_dict(load_config(None, ["tracking.project=other"]))  # no W&B, nothing split
    assert compare_config(saved, offline, TrainingProgress(50, 1, 100, 0, 0)) == []


def test_config_mismatches_say_which_value_wins():
    saved = to_dict(load_config(None, ["train.seed=1", "train.max_steps=100"]))
    current = to_dict(load_config(None, ["train.seed=2", "train.max_steps=200", "optim.lr=0.5"]))
    text = "\n".join(compare_config(saved, current, TrainingProgress(50, 1, 100, 0, 0)))
    assert "train.seed" in text and "checkpoint's RNG states and data order win (seed 1)" in text
    assert "train.max_steps" in text and "the config wins" in text
    assert "optim.lr: 0.0001 in the checkpoint, 0.5 in the config; the checkpoint's rate 0.0001 stays" in text
    assert compare_config(saved, saved, TrainingProgress(50, 1, 100, 0, 0)) == []
    assert "optim.scheduler" not in text  # the default schedule does not depend on the length
    longer = to_dict(load_config(None, ["train.seed=1", "train.max_steps=200", "optim.scheduler=cosine"]))
    cosine = to_dict(load_config(None, ["train.seed=1", "train.max_steps=100", "optim.scheduler=cosine"]))
    said = "\n".join(compare_config(cosine, longer, TrainingProgress(100, 1, 100, 0, 0)))
    assert (
        "optim.scheduler: cosine spans train.max_steps, so from step 102 the learning rate follows the 200-step" in said
    )


def test_guards_state_and_ema_round_trip():
    g = Guards(TrainConfig(divergence_factor=3.0))
    for loss in [1.0] * 12:
        g.check_divergence(loss)
    h = Guards(TrainConfig(divergence_factor=3.0))
    h.load_state_dict(g.state_dict())
    assert (h.running, h.best, h.seen) == (g.running, g.best, g.seen)
    with pytest.raises(TrainingStopped, match="diverging"):
        for _ in range(30):
            h.check_divergence(10.0)

    p = torch.nn.Parameter(torch.zeros(3))
    ema = LoRAEMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()
    assert torch.equal(ema.shadow[0], torch.ones(3))
    with ema.swapped_in():
        assert torch.equal(p.detach(), torch.ones(3))
    assert torch.equal(p.detach(), torch.full((3,), 2.0))
    other = LoRAEMA([p], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0])


def test_nonfinite_guard_counts_and_stops():
    g = Guards(TrainConfig(max_nonfinite_losses=2))
    assert g.step_is_finite(1.0, 0.5)
    assert not g.step_is_finite(float("nan"), 0.5)
    with pytest.raises(TrainingStopped, match="train.max_nonfinite_losses=2"):
        g.step_is_finite(1.0, float("inf"))


def test_a_fresh_run_refuses_a_folder_holding_files_of_its_names_that_no_run_wrote(tmp_path):
    """`output_dir: .` in a project folder replaced its config.yaml and README.md with the resolved config and the
    model card, silently; `qwen-lora validate` had said OK."""
    (tmp_path / "config.yaml").write_text("# my project\n")
    (tmp_path / "README.md").write_text("# my project\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    for overwrite in (False, True):  # --overwrite moves a run aside; these are not a run's
        with pytest.raises(RunFolderInUse) as refused:
            RunFolder(tmp_path).check_fresh_start(overwrite)
        assert str(refused.value) == (
            f"output_dir {tmp_path} holds config.yaml, README.md, which no run wrote (there is no run.json); a run "
            "writes files of these names and would replace them. Choose an empty or new output_dir"
        )
    RunFolder(tmp_path / "empty").check_fresh_start(False)
    (tmp_path / "fresh" / "samples").mkdir(parents=True)  # an empty samples/ holds nothing to lose
    RunFolder(tmp_path / "fresh").check_fresh_start(False)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "abc"}))  # a run that stopped before its checkpoint
    RunFolder(tmp_path).check_fresh_start(False)
