"""The trainer's command line, and its refusals that need no torch: `train/lora.py` runs `refuse_early` before it
imports torch, accelerate and diffusers (about 8 s), so a config, model or data source that cannot work is one line in
under a second instead of after the imports. `qwen-lora validate` makes the same checks (`check_sources`)."""

from __future__ import annotations

import argparse
import netrc
import os
import sys
import time
import urllib.parse

from qwen_image_lora import hub
from qwen_image_lora.cli import refuse_unknown
from qwen_image_lora.config import Config, ConfigError, load_config
from qwen_image_lora.data.cache_dir import check_cache_dir
from qwen_image_lora.data.sources import Item, check_edit_files, load_items
from qwen_image_lora.errors import UserError
from qwen_image_lora.train.run_folder import RunFolder

# Where each optimizer trains a LoRA; outside, a run either barely moves the adapter or tends to diverge. prodigy
# adapts its own step size: its lr is a multiplier, usually 1.0.
LR_RANGES = {"adamw": (1e-6, 1e-2), "adamw8bit": (1e-6, 1e-2), "prodigy": (0.1, 10.0)}
MAIN_SPEAKS_S = 3.0  # how long a rank other than the main one waits, on an error, before it exits


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train/lora.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--resume", default=None, help="'latest' (this output_dir's run) or a checkpoint folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an output_dir that holds another; the old run is moved aside, not deleted",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config changes settings that change the maths (lora.*, data.*, ...)",
    )
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value, e.g. train.max_steps=10")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line; an unknown option is refused naming the nearest one, as `qwen-lora` commands do."""
    args, extra = parser.parse_known_intermixed_args(argv)
    if extra:
        refuse_unknown(parser, extra)
    return args


def after_main_spoke(status: int) -> int:
    """`status`, once the main rank has had time to say why: another rank ending on an error waits a moment, since
    the launcher stops every rank as soon as one exits and the main rank's one line was lost (a clean CI run)."""
    if status and not is_main_rank():
        time.sleep(MAIN_SPEAKS_S)
    return status


def is_main_rank() -> bool:
    """Whether this is the main process of the launch, before accelerate is set up (the launcher sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def check_sources(cfg: Config) -> list[Item] | None:
    """What a training config points at, without torch: the base model (a model folder, or a cached or reachable hub
    id), the data cache folder, the data source (its items; None without `data.path`), the previews' input files and
    `lora.init_from`. Raises the UserError naming the field."""
    hub.check_pretrained(cfg.model.pretrained, cfg.model.revision)
    blocks = (hub.transformer_config_json(cfg.model.pretrained, cfg.model.revision) or {}).get("num_layers")
    if isinstance(blocks, int):
        check_offload_blocks(cfg.train.offload_blocks, blocks)
    check_cache_dir(cfg.data.cache_dir)
    items = load_items(cfg.data) if cfg.data.path else None  # a DataError names data.path (or the manifest line)
    check_edit_files(cfg.validation.edits, "validation.edits")
    hub.check_adapters([cfg.lora.init_from] if cfg.lora.init_from else [])
    check_wandb_login(cfg.tracking.backend)
    return items


def check_offload_blocks(offload_blocks: int | str, blocks: int) -> None:
    """More blocks to offload than the transformer has: refused by `validate` as by the trainer."""
    if offload_blocks != "auto" and offload_blocks > blocks:
        raise ConfigError(f"train.offload_blocks: {offload_blocks} is more than the transformer's {blocks} blocks")


def check_wandb_login(backend: str, env=os.environ) -> None:
    """W&B online with no API key (none in WANDB_API_KEY, none in the netrc `wandb login` writes): `validate` said OK
    and the trainer stopped after its imports. Offline and disabled modes need none."""
    if backend != "wandb" or env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if env.get("WANDB_API_KEY"):
        return
    host = urllib.parse.urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        found = netrc.netrc(env.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        found = False
    if not found:
        raise ConfigError(
            f"tracking.backend: wandb has no API key here (no WANDB_API_KEY, no {host} entry in the netrc); run "
            "`wandb login`, or set WANDB_MODE=offline to log to disk (`wandb sync` uploads it later)",
            "tracking.backend",
        )


def schedule_warnings(cfg: Config, resuming: bool = False) -> list[str]:
    """Settings that work but do not do what they seem to: said by the trainer and by `qwen-lora validate`."""
    said = []
    steps, warmup = cfg.train.max_steps, cfg.optim.warmup_steps
    if cfg.checkpoint.every_steps > steps and not resuming:  # a resumed run has its checkpoints
        said.append(f"checkpoint.every_steps={cfg.checkpoint.every_steps} > train.max_steps={steps}: the only "
                    "checkpoint will be the last step's")  # fmt: skip
    if warmup >= steps and cfg.optim.scheduler != "constant":
        said.append(f"optim.warmup_steps={warmup} >= train.max_steps={steps}: the learning rate never reaches optim.lr "
                    f"(at most {min(steps, warmup) / max(warmup, 1):.0%} of it); lower the warm-up")  # fmt: skip
    for text in cfg.validation.unused_said():
        said.append(f"validation.{text}: previews render without it")
    low, high = LR_RANGES[cfg.optim.name]
    if not low <= cfg.optim.lr <= high:
        effect = "the adapter barely moves" if cfg.optim.lr < low else "training tends to diverge"
        said.append(f"optim.lr={cfg.optim.lr:g} is outside {low:g}..{high:g}, where {cfg.optim.name} trains a LoRA: "
                    f"{effect}")  # fmt: skip
    return said


def refuse_early(argv: list[str], description: str) -> None:
    """Exit with the error's status and its one line (said by the main rank) when the config does not load, what it
    points at cannot work (`check_sources`) or a new run's output_dir holds another run; argparse's own exit for a bad
    command line or --help. Anything else is left to `main`."""
    args = parse(build_parser(description), argv)  # a bad command line or --help: said and out, now
    try:
        cfg = load_config(args.config, args.overrides)
        check_sources(cfg)
        if not args.resume:  # another run's folder: refused after 12 s of imports, where validate took 0.4 s
            RunFolder(cfg.output_dir).check_fresh_start(args.overwrite)
    except UserError as e:
        if is_main_rank():
            sys.stderr.write(e.line().replace("\n", " ") + "\n")
        raise SystemExit(after_main_spoke(e.exit_code)) from None
