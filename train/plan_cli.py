"""`qwen-lora plan`: the cheapest way a config's training step fits a GPU, and its memory, without a GPU or weights.

    qwen-lora plan --config configs/brand.yaml --gpu-memory 8GB --check     # the recipe for an 8 GB card
    qwen-lora plan --config configs/product_edit.yaml train.batch_size=2   # edit: references read from the data
    qwen-lora plan --config configs/brand.yaml --as-configured             # what train/lora.py will do as it is

By default it picks the recipe (`memory_fit.fit`): checkpointing first, then offloaded blocks, then an 8-bit
optimizer, then a quantized base, and prints it as config overrides with the host-link cost of offloading. With
`--as-configured` it plans the config's own settings, each `auto` one chosen as the trainer chooses it at launch.
The prediction is `torch.cuda.max_memory_allocated` of a steady-state step at the config's largest bucket (the
most pixels the sizing rule gives at data.resolution up to data.max_aspect: 576x1888 at 1024, 3.7% over 1024^2),
traced on fake tensors by `train/memory.py`, plus a stated margin for the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time

from qwen_image_lora.errors import InputError
from qwen_image_lora.knobs import MAX_INPUT_IMAGES

_UNITS = {"": 2**30, "g": 2**30, "gb": 2**30, "gib": 2**30, "m": 2**20, "mb": 2**20, "mib": 2**20}


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '24' (GiB) or '40960MiB' -> bytes. GB and GiB both mean 2**30 here: GPU sizes are sold
    in binary units (an "80GB" H100 has ~79.2 GiB usable, which the context margin covers)."""
    m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(
            f"--gpu-memory: expected a size such as 80GB, 24GiB or 40960MiB (got {text!r})", "--gpu-memory"
        )
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:  # 0 planned "nothing fits", exit 0 (0.0000000001 is 0 bytes)
        raise InputError(f"--gpu-memory: must be more than 0 (got {text!r})", "--gpu-memory")
    return size


def _plan(args) -> int:
    from qwen_image_lora.config import load_config

    cfg = load_config(args.config, args.overrides)
    gpu = parse_memory(args.gpu_memory) if args.gpu_memory else None  # None: train.memory_budget_gb, read below
    # After the config and the size are read: the planner traces a step with torch, diffusers and peft, which take
    # seconds to import, and a typo should not wait for them.
    from qwen_image_lora import model as qmodel
    from qwen_image_lora.config import ConfigError
    from qwen_image_lora.train import memory, memory_fit
    from qwen_image_lora.train.early import check_offload_blocks
    from qwen_image_lora.train.preflight import check_shardable

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if gpu is None:
        try:
            gpu = memory_fit.budget_bytes(cfg)
        except ConfigError as e:  # `auto` on a machine without a GPU: plan names the size to plan for
            raise InputError(f"{e}; or give the card's size here, e.g. --gpu-memory 24GB", "--gpu-memory") from None
    as_configured = args.as_configured or args.checkpointing != "config"
    if as_configured and args.processes > 1:
        check_shardable(cfg)
    if args.checkpointing != "config":
        cfg.train.gradient_checkpointing = {"all": True, "none": False}.get(args.checkpointing, "auto")
        try:  # the config's own rule: offloaded blocks are checkpointed (`none` was planned as every block)
            cfg.train.validate("train")
        except ConfigError as e:
            raise InputError(f"--checkpointing {args.checkpointing}: {e}", "--checkpointing") from None
    # the trainer's refusal, not a traceback from the planner
    blocks = qmodel.load_transformer_config(cfg.model.pretrained, cfg.model.revision)["num_layers"]
    check_offload_blocks(cfg.train.offload_blocks, blocks)
    references = args.references if args.references is not None else _references(cfg)
    start = time.perf_counter()
    if as_configured:
        recipe = memory_fit.resolve(
            cfg, references, gpu_bytes=gpu, prompt_tokens=args.prompt_tokens, plan_fixed=True, shards=args.processes
        )
        print(f"as configured, for {gpu / 2**30:.1f} GiB: {recipe.describe()}")
    else:
        inputs = memory.plan_inputs_from_config(cfg, references=references, prompt_tokens=args.prompt_tokens)
        inputs.shards = args.processes
        recipe = memory_fit.fit(inputs, gpu)
        verdict = "recipe" if recipe.fits else "nothing fits; the most frugal recipe"
        print(f"{verdict} for {gpu / 2**30:.1f} GiB: {recipe.describe()}")
    print(f"  {' '.join(recipe.overrides())}")
    if not recipe.fits:
        print("  to fit: lower data.resolution or train.batch_size (as KEY=VALUE here), or plan a larger card")
    if args.processes > 1:
        print(
            f"  launch: accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes {args.processes} "
            "train/lora.py --config ..."
        )
    print(f"  {recipe.transfer_line()}")
    print(recipe.plan.format(gpu))
    print(
        f"(planned on CPU in {time.perf_counter() - start:.0f} s, not measured; on an H100 the bf16 plans came within "
        "0.5% of the measured peak; offloaded, quantized and FSDP2 plans are not yet measured)"
    )
    return 0 if recipe.fits or not args.check else 1


def _reference_count(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_INPUT_IMAGES:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_INPUT_IMAGES}, the model's limit (got {text!r})")
    return int(text)


MAX_PLAN_PROMPT_TOKENS = 8192  # 8x the caption limit's default; a runaway count traced for minutes in gigabytes


def _prompt_tokens(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_PLAN_PROMPT_TOKENS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_PLAN_PROMPT_TOKENS} text tokens (got {text!r})")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, 1 or more (got {text!r})")
    return int(text)


def _references(cfg) -> int:
    """Reference images of the config's largest edit: from the data when it can be read, else from the
    validation edits. 0 plans a text-to-image step."""
    from qwen_image_lora.data.sources import DataError, load_items

    try:
        count = max(len(item.sources) for item in load_items(cfg.data))
        where = f"data.path ({cfg.data.path})"
    except (DataError, OSError, ValueError):
        count = max((len(e.images) for e in cfg.validation.edits), default=0)
        where = "validation.edits (data.path not readable here)" if cfg.validation.edits else "no readable data.path"
    print(
        f"planning {'an edit step with ' + str(count) + ' reference image(s)' if count else 'a text-to-image step'}"
        f", from {where}; --references N overrides"
    )
    return count


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="the recipe that fits a GPU, and its peak memory (no GPU, no weights)")
    p.add_argument("--config", required=True, help="training config (YAML)")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value")
    p.add_argument("--gpu-memory", default=None, help="GPU size to fit, e.g. 8GB (default: train.memory_budget_gb)")
    p.add_argument(
        "--references",
        type=_reference_count,
        default=None,
        help=f"reference images per edit example, 0 to {MAX_INPUT_IMAGES} (0 = text-to-image; default: from the data)",
    )
    p.add_argument(
        "--prompt-tokens", type=_prompt_tokens, default=256, help="text tokens of the longest prompt (default 256)"
    )
    p.add_argument(
        "--checkpointing", choices=["config", "all", "none", "auto"], default="config",
        help="override train.gradient_checkpointing (implies --as-configured)",
    )  # fmt: skip
    p.add_argument(
        "--as-configured",
        action="store_true",
        help="plan the config's own settings (auto ones as the trainer picks them), not the cheapest recipe",
    )
    p.add_argument(
        "--processes", type=_positive, default=1,
        help="FSDP2 processes sharing the base (configs/accelerate/fsdp.yaml); the plan is one process's GPU",
    )  # fmt: skip
    p.add_argument("--check", action="store_true", help="exit 1 when the step does not fit")
    p.set_defaults(func=_plan)


if __name__ == "__main__":  # python train/plan_cli.py --config ...
    parser = argparse.ArgumentParser(prog="qwen-lora")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["plan", *sys.argv[1:]])
    raise SystemExit(ns.func(ns))
