"""The one place a run folder's files are named. The trainer writes them; eval, export, the studio and the tests read
them through these names, so a renamed file cannot leave a reader behind:

    <run>/run.json                              {"run_id", "started", "tracking_id"} of the run that owns the folder
    <run>/.lock                                 flock-ed by the live trainer (its pid inside)
    <run>/config.yaml                           the resolved config
    <run>/losses.jsonl                          one {"step", "loss", "lr", "grad_norm"} per optimizer step
    <run>/samples/step_000250/                  validation previews at that step
    <run>/checkpoints/step-000250/adapter/      a resumable checkpoint (progress.json, its config.yaml, ...)
    <run>/pytorch_lora_weights.safetensors      the final adapter, with
    <run>/training_metadata.json                what the finished run did, and
    <run>/README.md                             its model card
    <run>/eval/                                 the evaluation report
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

RUN_ID = "run.json"
LOCK = ".lock"
CONFIG = "config.yaml"
LOSSES = "losses.jsonl"
METADATA = "training_metadata.json"
CARD = "README.md"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"  # inside a checkpoint: what a resume restores
ADAPTER = "adapter"  # inside a checkpoint: the adapter folder at that step
EVAL = "eval"
# diffusers' own LoRA file name (what `save_lora_weights` writes and `load_lora_weights` looks for), named here so that
# reading a run's layout imports no library; `adapter_format.WEIGHTS_NAME` is this name.
FINAL_ADAPTER = "pytorch_lora_weights.safetensors"

_CHECKPOINT = re.compile(r"^step-(\d+)$")
_SAMPLES = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:06d}"


def samples_dir(run: Path, step: int) -> Path:
    return Path(run) / SAMPLES / f"step_{step:06d}"


def checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint folder's name (`step-000250` -> 250); None for any other name."""
    match = _CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoints(run: Path) -> list[Path]:
    """Checkpoint folders of a run folder, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def sample_steps(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every validation-sample folder of a run, oldest first."""
    root = Path(run) / SAMPLES
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _SAMPLES.match(p.name)) and p.is_dir()]
    return sorted(found)


def run_holding(path: str | Path) -> Path | None:
    """The run folder `path` is, or lies in: the nearest folder at or above it holding run.json (links resolved)."""
    path = Path(path).expanduser().resolve()
    return next((p for p in (path, *path.parents) if (p / RUN_ID).is_file()), None)


def trained_config(adapter: str | Path) -> tuple[dict, Path] | None:
    """(the config, its config.yaml) that trained `adapter`: a run or checkpoint folder, a file in one, or a
    checkpoint's adapter folder or the file in that; None for an adapter from elsewhere."""
    path = Path(adapter).expanduser()
    checkpoint = path.parent.parent if path.parent.name == ADAPTER else path.parent
    for config in (path / CONFIG, path.parent / CONFIG, checkpoint / CONFIG):
        try:
            data = yaml.safe_load(config.read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance((data.get("data") or {}).get("resolution"), int):
            return data, config
    return None
