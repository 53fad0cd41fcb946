"""The trainer's command line, and its refusals that need no torch: `train/lora.py` runs `refuse_early` before it
imports torch, accelerate and diffusers (about 8 s), so a config, model or data source that cannot work is one line in
under a second, as `qwen-lora validate` would say it, instead of after the imports."""

from __future__ import annotations

import argparse
import os
import sys

from qwen_image_lora.config import load_config
from qwen_image_lora.data.cache_dir import check_cache_dir
from qwen_image_lora.data.sources import load_items
from qwen_image_lora.errors import UserError
from qwen_image_lora.hub import check_pretrained


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


def is_main_rank() -> bool:
    """Whether this is the main process of the launch, before accelerate is set up (the launcher sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def refuse_early(argv: list[str], description: str) -> None:
    """Exit with the error's status and its one line (said by the main rank) when the config does not load, the base
    model is neither a model folder nor a cached or reachable hub id, or the data source does not parse; argparse's
    own exit for a bad command line or --help. Anything else is left to `main`."""
    args = build_parser(description).parse_intermixed_args(argv)  # a bad command line or --help: said and out, now
    try:
        cfg = load_config(args.config, args.overrides)
        check_pretrained(cfg.model.pretrained, cfg.model.revision)
        check_cache_dir(cfg.data.cache_dir)
        if cfg.data.path:
            load_items(cfg.data)
    except UserError as e:
        if is_main_rank():
            sys.stderr.write(e.line().replace("\n", " ") + "\n")
        raise SystemExit(e.exit_code) from None
