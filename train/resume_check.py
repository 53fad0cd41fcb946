"""What a resume may change: the checkpoint's resolved config against this run's. Settings that change the maths
(marked FIXED in the schema) or the adapter's shape are refused, naming them; free settings are warnings saying
which value wins."""

from __future__ import annotations

from pathlib import Path

from qwen_image_lora.config import resume_fixed_fields
from qwen_image_lora.train.checkpoint import Checkpointer, CheckpointError, TrainingProgress


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _differences(name: str, old, new) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):  # a FIXED section: name the leaves that changed
        return [d for key in {**old, **new} for d in _differences(f"{name}.{key}", old.get(key), new.get(key))]
    return [] if old == new else [f"{name}: {old!r} -> {new!r}"]


# The settings that give the adapter its tensors' names and shapes: a checkpoint's adapter cannot take others.
ADAPTER_SHAPE = ("lora.rank", "lora.targets", "lora.use_dora")


def changed_fixed_fields(saved: dict, current: dict) -> list[str]:
    """'field: checkpoint -> now' for each field the schema marks FIXED (changes the maths) that differs."""
    return [d for name in resume_fixed_fields() for d in _differences(name, _get(saved, name), _get(current, name))]


def check_resume(path: Path, current: dict, allow_change: bool) -> tuple[TrainingProgress, list[str]]:
    """(the checkpoint's progress, warnings) for resuming `path` with config `current`. Changed FIXED fields are an
    error naming them, unless `allow_change` (then warnings); other differences are warnings saying which wins."""
    progress, saved = Checkpointer.peek(path)
    changed = changed_fixed_fields(saved, current)
    reshaped = [d for name in ADAPTER_SHAPE for d in _differences(name, _get(saved, name), _get(current, name))]
    if reshaped:  # was allowed, then failed loading the checkpoint's adapter: "shape (8, 16) in the file, (4, 16) here"
        raise CheckpointError(
            f"resume from {path}: {'; '.join(reshaped)} changes the adapter's shape, which no resume can do (not even "
            "with --allow-config-change). Set it back, or start a new run in a new output_dir"
        )
    if current["train"]["max_steps"] < progress.step:  # was "the config wins", then the final adapter was step k's
        raise CheckpointError(
            f"resume from {path}: train.max_steps={current['train']['max_steps']} is below the checkpoint's step "
            f"{progress.step}; raise train.max_steps past {progress.step}, or resume a checkpoint at or before step "
            f"{current['train']['max_steps']} into a new output_dir"
        )
    if changed and not allow_change:
        raise CheckpointError(
            f"resume from {path}: this config changes settings that change the maths of the run "
            f"({'; '.join(changed)}). Set them back, start a new run in a new output_dir, or pass "
            "--allow-config-change to continue anyway"
        )
    allowed = [
        f"{c} (allowed by --allow-config-change; the run no longer matches an uninterrupted one)" for c in changed
    ]
    return progress, allowed + compare_config(saved, current, progress)


def compare_config(saved: dict, current: dict, progress: TrainingProgress) -> list[str]:
    """Human-readable warnings for free settings that differ between the checkpoint and this run, saying which wins."""
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
        if current["optim"]["scheduler"] not in ("constant", "constant_with_warmup"):
            warnings.append(
                f"optim.scheduler: {current['optim']['scheduler']} spans train.max_steps, so from step "
                f"{progress.step + 2} the learning rate follows the {current['train']['max_steps']}-step curve (it "
                "jumps there); a run of that length from the start would differ"
            )
    # What a resume does with the schedule (measured): the scheduler is built from the config, so its curve, warm-up
    # and length are the config's, and the checkpoint's state restores its base rate, its step and the rate of the
    # next step, so the first step after the resume trains at the old curve's rate. Each warning says so.
    optim, base = saved.get("optim", {}), saved.get("optim", {}).get("lr")
    for key, what in (
        ("lr", f"the checkpoint's rate {base!r} stays the schedule's base rate; the config's is not applied"),
        ("scheduler", f"step {progress.step + 1} trains at the checkpoint's next rate, then the rate follows the "
                      f"config's curve at the checkpoint's base rate {base!r}"),
        ("warmup_steps", "the config's warm-up shapes the curve from the checkpoint's step on"),
        ("name", "the checkpoint's optimizer state is loaded into the config's optimizer"),
    ):  # fmt: skip
        if optim.get(key) != current["optim"][key]:
            warnings.append(f"optim.{key}: {optim.get(key)!r} in the checkpoint, {current['optim'][key]!r} in the "
                            f"config; {what}")  # fmt: skip
    tracking = saved.get("tracking", {})
    if current["tracking"]["backend"] == "wandb" and tracking.get("project") != current["tracking"]["project"]:
        warnings.append(f"tracking.project: {tracking.get('project')!r} in the checkpoint, "
                        f"{current['tracking']['project']!r} in the config; the W&B run continues in the config's "
                        "project, so its history is split between the two")  # fmt: skip
    return warnings
