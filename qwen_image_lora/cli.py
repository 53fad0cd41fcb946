"""`qwen-lora`: one command with a subcommand per component. Each component module provides
`register(subparsers)`; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import sys

from qwen_image_lora.config import ConfigError, load_config

# Each module adds its own subcommands (and their options) in `register(subparsers)`.
COMMAND_MODULES = [
    "qwen_image_lora.data.cli",  # data doctor | prepare | caption
    "qwen_image_lora.train.cli",  # export
    "qwen_image_lora.train.plan_cli",  # plan
    "qwen_image_lora.inference.cli",  # generate | edit | batch | serve
    "qwen_image_lora.eval.cli",  # eval
]


def _validate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(f"{args.config}: OK (model {cfg.model.pretrained}, output {cfg.output_dir})")
    return 0


def _make_tiny_model(args) -> int:
    from qwen_image_lora.tiny_model import make_tiny_model

    print(make_tiny_model(args.output_dir, seed=args.seed, overwrite=args.overwrite))
    return 0


def _make_sample_data(args) -> int:
    from qwen_image_lora.sample_data import make_sample_data

    print(make_sample_data(args.output_dir, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config without loading any weights")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_validate)

    p = sub.add_parser("make-tiny-model", help="write the tiny random Qwen-Image-2.1 checkpoint used by tests and the demo")
    p.add_argument("output_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("make-sample-data", help="write the bundled synthetic brand and edit-pair data set")
    p.add_argument("output_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_sample_data)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a missing dependency inside the module is a real error
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
