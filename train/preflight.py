"""What a run can check without weights, in seconds, before the recipe loads 7B of them."""

from __future__ import annotations

import logging
from pathlib import Path

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import Config, ConfigError
from qwen_image_lora.train import optim
from qwen_image_lora.train.tracking import check_tracker_available

logger = logging.getLogger("qwen_image_lora.train")


def check_before_loading(cfg: Config) -> None:
    """What can fail without weights fails here, in seconds, naming the field."""
    optim.check_optimizer_available(cfg.optim.name)
    qmodel.check_quantize(cfg.model.quantize)
    try:
        qmodel.check_speed_settings(cfg.model.attention, cfg.model.attention_backend, cfg.model.compile)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    check_tracker_available(cfg.tracking)
    if not cfg.data.path:
        raise ConfigError("data.path: set it to a folder of images + captions or a .jsonl/.csv manifest")
    for i, edit in enumerate(cfg.validation.edits):
        for path in edit.images:
            if not Path(path).is_file():
                raise ConfigError(f"validation.edits[{i}].images: {path} does not exist")
    if cfg.checkpoint.every_steps > cfg.train.max_steps:
        logger.warning(
            "checkpoint.every_steps=%d > train.max_steps=%d: no resumable checkpoint will be written",
            cfg.checkpoint.every_steps,
            cfg.train.max_steps,
        )
