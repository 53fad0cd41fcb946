"""One narrow interface over accelerate's trackers (W&B, TensorBoard or none), used from the main process only:
`start(config, tracking_id)`, `log(metrics, step)`, `log_images(images, step)`, `upload_adapter(folder, files)`,
`finish(exit_code)`.

W&B honours its own environment (`WANDB_MODE=offline` writes a local run under `<output_dir>/wandb`, or under
`$WANDB_DIR/wandb` when that is set). A run folder's training is one W&B run whatever resumes it (its id is the
folder's `tracking_id`), metrics are plotted against their `step` (W&B's own step only counts up, so steps trained
again after a kill would be dropped), and the run ends with the process's exit status.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from qwen_image_lora.config import ConfigError, TrackingConfig
from qwen_image_lora.console import WANDB_SETTINGS
from qwen_image_lora.train.preemption import EXIT_PREEMPTED

_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def check_tracker_available(cfg: TrackingConfig) -> None:
    if cfg.backend in _PACKAGES and importlib.util.find_spec(_PACKAGES[cfg.backend]) is None:
        raise ConfigError(
            f"tracking.backend: {cfg.backend!r} needs the {_PACKAGES[cfg.backend]!r} package: pip install {_PACKAGES[cfg.backend]}"
        )


def log_with(cfg: TrackingConfig) -> list[str]:
    """The `log_with` argument for `Accelerator(...)`."""
    return [] if cfg.backend == "none" else [cfg.backend]


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"optim.lr": 1e-4, ...} with only scalar values (TensorBoard hparams need that)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class Tracker:
    def __init__(self, accelerator, cfg: TrackingConfig, output_dir: str | Path):
        self.accelerator, self.cfg, self.output_dir = accelerator, cfg, Path(output_dir)
        self.enabled = cfg.backend != "none"
        self.started = False

    def start(self, config: dict, tracking_id: str) -> None:
        """`tracking_id`: the run folder's (`RunFolder.tracking_id`), so a resume continues the same W&B run. A W&B
        that cannot start (no login, no network, a project it refuses) raises ConfigError naming what to do."""
        if not self.enabled:
            return
        init_kwargs = {}
        if self.cfg.backend == "wandb":
            folder = Path(os.environ.get("WANDB_DIR") or self.output_dir)
            (folder / "wandb").mkdir(parents=True, exist_ok=True)  # else W&B warns, then makes it anyway
            init_kwargs["wandb"] = {"name": self.cfg.run_name, "settings": WANDB_SETTINGS, "id": tracking_id,
                                    "resume": "allow", "dir": str(folder)}  # fmt: skip
        try:
            self.accelerator.init_trackers(self.cfg.project, config=flatten(config), init_kwargs=init_kwargs)
        except Exception as e:
            if self.cfg.backend != "wandb" or not _is_wandb_error(e):
                raise
            raise ConfigError(
                f"tracking.backend: W&B did not start ({type(e).__name__}: {e}); log in with `wandb login` (or set "
                "WANDB_API_KEY), or set WANDB_MODE=offline to sync later, or tracking.backend=none"
            ) from None
        self.started = True
        if self.cfg.backend == "wandb" and self.accelerator.is_main_process:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.define_metric("step")
            run.define_metric("*", step_metric="step")

    def log(self, metrics: dict, step: int) -> None:
        if self.enabled and self.cfg.backend == "wandb":
            self.accelerator.log({**metrics, "step": step})
        elif self.enabled:
            self.accelerator.log(metrics, step=step)

    def log_images(self, images: dict[str, Image.Image], step: int) -> None:
        if not (self.enabled and self.cfg.log_images and images and self.accelerator.is_main_process):
            return
        tracker = self.accelerator.get_tracker(self.cfg.backend, unwrap=True)
        if self.cfg.backend == "wandb":
            import wandb  # noqa: PLC0415 - wandb only for tracking.backend: wandb (a slow import)

            tracker.log(
                {**{f"samples/{k}": wandb.Image(v.convert("RGB"), caption=k) for k, v in images.items()}, "step": step}
            )
        elif self.cfg.backend == "tensorboard":
            for name, image in images.items():
                tracker.add_image(f"samples/{name}", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def upload_adapter(self, folder: str | Path, files: list[Path], name: str = "lora") -> None:
        """`files` (the adapter, its config, metadata, card and the card's samples) as a W&B model artifact under
        their names in `folder` (a no-op for other backends). Not the folder: its checkpoints hold optimizer states
        (gigabytes on the 7B model) and W&B's own run files."""
        if not (
            self.enabled
            and self.cfg.backend == "wandb"
            and self.cfg.upload_adapter
            and self.accelerator.is_main_process
        ):
            return
        import wandb  # noqa: PLC0415 - wandb only for tracking.backend: wandb (a slow import)

        run = self.accelerator.get_tracker("wandb", unwrap=True)
        # one collection per training run: its run_name, else its W&B id (an offline run has no name)
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{self.cfg.run_name or run.id or name}-adapter"), "model")
        for path in files:
            artifact.add_file(str(path), name=Path(path).relative_to(folder).as_posix())
        run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        """Close the tracker with the run's exit status: W&B shows a stopped run as failed (a guard, an error) or
        preempted (SIGTERM, resumable), not as finished."""
        if not self.enabled or (self.accelerator.is_main_process and not self.started):
            return  # a W&B that did not start has no run to finish (accelerate's finish would raise)
        if self.cfg.backend == "wandb" and self.accelerator.is_main_process:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            if exit_code == EXIT_PREEMPTED:
                run.mark_preempting()
            run.finish(exit_code=exit_code)  # accelerate's own finish below then has nothing left to do
        self.accelerator.end_training()


def _is_wandb_error(error: Exception) -> bool:
    import wandb  # noqa: PLC0415 - wandb only for tracking.backend: wandb (a slow import)

    return isinstance(error, wandb.errors.Error)
