"""Resumable checkpoints: a typed progress record plus everything needed to continue the exact run.

    <output_dir>/checkpoints/step-000250/
        adapter/pytorch_lora_weights.safetensors   the LoRA weights, loadable by `load_lora_weights` as they are
        training_state.pt                          optimizer, LR scheduler, EMA, guards, per-rank RNG states
        progress.json                              TrainingProgress (step, seed, sampler cursor, ...)
        config.yaml                                the resolved config of the run that wrote it

A checkpoint is written into a temporary folder and renamed into place, so a crash leaves either the whole
checkpoint or none; any error while writing is raised, never logged and skipped. Only the newest `keep_last`
are kept. `load()` returns what was saved; the recipe restores it and `compare_config` reports disagreements.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from qwen_image_lora.io import atomic_dir

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or restored completely."""


@dataclass
class TrainingProgress:
    step: int  # optimizer steps done
    seed: int
    max_steps: int
    epoch: int  # sampler cursor: the next batch is (epoch, position)
    position: int
    samples_seen: int = 0
    num_processes: int = 1
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ RNG


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and (when present) every CUDA device's RNG state of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ saving / loading


class Checkpointer:
    def __init__(self, output_dir: str | Path, keep_last: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def resolve(self, resume: str) -> Path:
        """`latest` or a checkpoint folder -> the folder; a clear error when there is none."""
        if resume == "latest":
            path = self.latest()
            if path is None:
                raise CheckpointError(f"--resume latest: no checkpoint under {self.root}")
            return path
        path = Path(resume)
        if not (path / "progress.json").is_file():
            raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no progress.json)")
        return path

    def save(
        self,
        progress: TrainingProgress,
        write_adapter,
        training_state: dict,
        config: dict,
    ) -> Path:
        """Write one checkpoint atomically and rotate old ones. `write_adapter(folder)` writes the weights."""
        path = self.path_for(progress.step)
        try:
            with atomic_dir(path) as tmp:
                write_adapter(tmp / "adapter")
                torch.save(training_state, tmp / "training_state.pt")
                (tmp / "progress.json").write_text(json.dumps(dataclasses.asdict(progress), indent=2))
                (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        except Exception as e:
            raise CheckpointError(f"could not write checkpoint {path}: {type(e).__name__}: {e}") from e
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def peek(path: str | Path) -> tuple[TrainingProgress, dict]:
        """(progress, saved config) without reading the optimizer state."""
        path = Path(path)
        try:
            return (TrainingProgress(**json.loads((path / "progress.json").read_text())),
                    yaml.safe_load((path / "config.yaml").read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e

    @staticmethod
    def load(path: str | Path) -> tuple[TrainingProgress, Path, dict, dict]:
        """(progress, adapter folder, training state, saved config) from a checkpoint folder."""
        path = Path(path)
        try:
            progress = TrainingProgress(**json.loads((path / "progress.json").read_text()))
            state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
            config = yaml.safe_load((path / "config.yaml").read_text())
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
        adapter = path / "adapter"
        if not (adapter / "pytorch_lora_weights.safetensors").is_file():
            raise CheckpointError(f"checkpoint {path} has no adapter/pytorch_lora_weights.safetensors")
        return progress, adapter, state, config


def compare_config(saved: dict, current: dict, progress: TrainingProgress) -> list[str]:
    """Human-readable warnings for settings that differ between the checkpoint and this run, saying which wins."""
    warnings = []
    if saved.get("train", {}).get("seed") != current["train"]["seed"]:
        warnings.append(
            f"train.seed: the checkpoint was trained with {saved['train']['seed']}, the config says "
            f"{current['train']['seed']}; the checkpoint's RNG states and data order win (seed {progress.seed})"
        )
    if saved.get("train", {}).get("max_steps") != current["train"]["max_steps"]:
        warnings.append(
            f"train.max_steps: the checkpoint's run aimed for {saved['train']['max_steps']}, the config says "
            f"{current['train']['max_steps']}; the config wins (training continues from step {progress.step})"
        )
    for section in ("lora", "model"):
        if saved.get(section) != current.get(section):
            warnings.append(f"{section}: differs from the checkpoint's; loading its weights may fail")
    for key in ("lr", "name", "scheduler", "warmup_steps"):
        if saved.get("optim", {}).get(key) != current["optim"][key]:
            warnings.append(
                f"optim.{key}: {saved['optim'][key]!r} in the checkpoint, {current['optim'][key]!r} in the config; "
                "the checkpoint's optimizer and scheduler state wins"
            )
    return warnings
