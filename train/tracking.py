"""One narrow interface over accelerate's trackers (W&B, TensorBoard or none), used from the main process only:
`start(config)`, `log(metrics, step)`, `log_images(images, step)`, `upload_adapter(folder, files)`, `finish()`.

W&B honours its own environment (`WANDB_MODE=offline` writes a local run under `<output_dir>/wandb`, or under
`$WANDB_DIR/wandb` when that is set). A training run is one W&B run whatever resumes it: its id is the run's id, and
metrics are plotted against their `step` (W&B's own step only counts up, so steps retrained after a kill would be
dropped).
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

    def start(self, config: dict, run_id: str) -> None:
        """`run_id`: the training run's (`run_folder`), so a resume continues the same W&B run."""
        if not self.enabled:
            return
        init_kwargs = {}
        if self.cfg.backend == "wandb":
            wandb = {"name": self.cfg.run_name, "settings": WANDB_SETTINGS, "id": run_id, "resume": "allow"}
            if "WANDB_DIR" not in os.environ:
                (self.output_dir / "wandb").mkdir(parents=True, exist_ok=True)
                wandb["dir"] = str(self.output_dir)
            init_kwargs["wandb"] = wandb
        self.accelerator.init_trackers(self.cfg.project, config=flatten(config), init_kwargs=init_kwargs)
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
        artifact = wandb.Artifact(name=re.sub(r"[^\w.-]", "-", f"{run.name or name}-adapter"), type="model")
        for path in files:
            artifact.add_file(str(path), name=Path(path).relative_to(folder).as_posix())
        run.log_artifact(artifact)

    def finish(self) -> None:
        if self.enabled:
            self.accelerator.end_training()
