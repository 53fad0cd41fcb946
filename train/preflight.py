"""What a run can check without weights, in seconds, before the recipe loads 7B of them."""

from __future__ import annotations

import logging

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from qwen_image_lora import model as qmodel
from qwen_image_lora import speed
from qwen_image_lora.config import Config, ConfigError
from qwen_image_lora.data.cache_dir import check_cache_dir
from qwen_image_lora.data.sources import check_edit_files
from qwen_image_lora.hub import check_adapters
from qwen_image_lora.train import adapter, optim, ranks
from qwen_image_lora.train.early import schedule_warnings
from qwen_image_lora.train.tracking import check_tracker_available

logger = logging.getLogger("qwen_image_lora.train")


def check_before_loading(cfg: Config, resuming: bool = False) -> None:
    """What can fail without weights fails here, in seconds, naming the field."""
    optim.check_optimizer_available(cfg.optim.name)
    qmodel.check_quantize(cfg.model.quantize)
    try:
        speed.check_speed_settings(cfg.model.attention, cfg.model.attention_backend, cfg.model.compile)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    check_tracker_available(cfg.tracking)
    # fp16 on the CPU: accelerate trains fp32, silently. `cpu=` as Accelerator reads it (without, a GPU host's state
    # stays on CUDA under ACCELERATE_USE_CPU).
    if (
        cfg.train.mixed_precision == "fp16"
        and PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device.type == "cpu"
    ):
        raise ConfigError("train.mixed_precision: fp16 has no autocast on the CPU (the run would train in float32 "
                          'while its model card said fp16); use bf16 or "no"', "train.mixed_precision")  # fmt: skip
    if ranks.fsdp_launch():
        check_shardable(cfg)
    elif ranks.launched_processes() > 1 and cfg.train.offload_blocks not in (0, "auto"):  # was found after the load
        raise ConfigError(
            "train.offload_blocks: offloading trains on one process (DDP keeps the whole model on each GPU); set it "
            "to 0 or launch one process",
            "train.offload_blocks",
        )
    elif ranks.launched_processes() > 1 and cfg.model.quantize != "none":
        raise ConfigError(
            f"model.quantize: {cfg.model.quantize} does not train under DDP (DDP broadcasts every weight at start, "
            "which a quantized base cannot); set model.quantize: none, launch one process, or shard an unquantized "
            "base with configs/accelerate/fsdp.yaml",
            "model.quantize",
        )
    if not cfg.data.path:
        raise ConfigError("data.path: set it to a folder of images + captions or a .jsonl/.csv manifest")
    check_cache_dir(cfg.data.cache_dir)
    check_edit_files(cfg.validation.edits, "validation.edits")
    adapter.check_targets_before_loading(cfg.model, cfg.lora)
    if cfg.lora.init_from:  # a mistyped path failed after the weights had loaded
        check_adapters([cfg.lora.init_from])
    for warning in schedule_warnings(cfg, resuming):
        logger.warning("%s", warning)


def check_shardable(cfg: Config) -> None:
    """Under FSDP2 the shards are the memory saving; what `fully_shard` cannot split, or what was never run sharded,
    is refused before loading (`qwen-lora plan --processes N` never picks these either)."""
    if cfg.model.quantize != "none":
        raise ConfigError(
            f"model.quantize: {cfg.model.quantize} does not shard under FSDP2 (fully_shard cannot split quantized "
            "weights); set model.quantize: none, or train on one process"
        )
    if cfg.optim.name == "adamw8bit":
        raise ConfigError(
            "optim.name: adamw8bit is not supported under FSDP2 (bitsandbytes' 8-bit state is not sharded); "
            "use adamw, or train on one process"
        )
    if cfg.train.offload_blocks not in (0, "auto"):
        raise ConfigError(
            "train.offload_blocks: offloading trains on one process (under FSDP2 each process holds 1/N of the "
            "blocks already); set it to 0"
        )
