"""`qwen-lora`: one command with a subcommand per component. Each component module provides
`register(subparsers)`; this file only wires them together (and holds the user-facing `--help`)."""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.metadata
import os
import re
import sys

from qwen_image_lora import __version__
from qwen_image_lora.config import ModelConfig, load_config
from qwen_image_lora.console import counted
from qwen_image_lora.errors import UserError
from qwen_image_lora.io import describe_write_error, is_write_error

DESCRIPTION = """\
Teach Qwen-Image 2.x your products, styles and typography with LoRA, check that the adapter beats the
base model, and serve it. Training itself runs under accelerate: accelerate launch train/lora.py --config CFG

the workflow, in order:
  qwen-lora validate configs/brand.yaml                 check a config, its paths and its data (seconds)
  qwen-lora data doctor configs/brand.yaml              what is wrong with my data?
  qwen-lora data prepare --config configs/brand.yaml    encode latents and prompts once
  accelerate launch train/lora.py --config configs/brand.yaml
  qwen-lora eval --config configs/brand.yaml --adapter outputs/brand --checkpoints outputs/brand
  qwen-lora generate --config configs/brand.yaml --lora outputs/brand --prompt "a qwnbrand bottle" --output a.png

Every command that reads a config takes section.key=value overrides, e.g. train.max_steps=10 model.dtype=float32.
`qwen-lora COMMAND --help` shows a command's options."""

# Each module adds its own subcommands (and their options) in `register(subparsers)`.
COMMAND_MODULES = [
    "qwen_image_lora.data.cli",  # data doctor | prepare | caption
    "qwen_image_lora.train.cli",  # export
    "qwen_image_lora.train.plan_cli",  # plan
    "qwen_image_lora.inference.cli",  # generate | edit | batch | serve
    "qwen_image_lora.eval.cli",  # eval
]


def config_or_target(args) -> str | None:
    """The config given as `--config CFG` or as the command's positional TARGET (`validate`, `data doctor`); with
    --config, the first override lands in TARGET and goes back to the overrides."""
    if args.config and args.target:
        args.overrides, args.target = [args.target, *args.overrides], None
    return args.config or args.target


def _one_config(args) -> None:
    """`validate CFG` or `validate --config CFG`, as the other commands spell it (it was refused)."""
    args.config = config_or_target(args)
    if not args.config:
        raise UserError("validate: give the config, e.g. `qwen-lora validate configs/brand.yaml`", "config")


def _validate(args) -> int:
    """The config, then what it points at (the trainer's own early checks), the eval edits' input files and the run
    folder; no torch imported, no weights loaded (0.4 s)."""
    from qwen_image_lora.data.sources import DataError, check_edit_files
    from qwen_image_lora.train.early import check_sources, schedule_warnings
    from qwen_image_lora.train.run_folder import RunFolder, RunFolderInUse, check_not_nested

    cfg = load_config(args.config, args.overrides)
    items = check_sources(cfg)
    if items is None:
        data = "data.path not set (needed only for training)"
    else:
        edits = sum(it.kind == "edit" for it in items)
        files = {it: [p for p in (it.target, *it.sources, *filter(None, [it.mask])) if not p.is_file()] for it in items}
        missing = [it for it in items if files[it]]
        data = f"data {counted(len(items), 'item')} ({len(items) - edits} t2i, {edits} edit) in {cfg.data.path}"
        example = f"e.g. {missing[0].id} ({files[missing[0]][0]} does not exist)" if missing else ""
        if missing and len(missing) == len(items):  # said OK of a config whose training then found nothing to train
            raise DataError(f"data.path: every item names a missing file, {example}; a manifest's paths are relative "
                            "to its folder")  # fmt: skip
        if missing:
            data += f"; {len(missing)} name a missing file, {example} (`qwen-lora data doctor` lists them)"
    check_edit_files(cfg.eval.edits, "eval.edits")
    check_not_nested(cfg.output_dir)
    notes = [f"warning: {w}" for w in schedule_warnings(cfg)]
    folder = RunFolder(cfg.output_dir)
    try:
        folder.check_fresh_start(overwrite=False)
    except RunFolderInUse as e:  # another run's folder: fine to --resume; files no run wrote: no run may start there
        if folder.owner() is None and not folder.has_run():
            raise
        notes.append(f"note: {e}")
    print(f"{args.config}: OK (model {cfg.model.pretrained}, output {cfg.output_dir})\n  {data}")
    for note in notes:
        print(f"  {note}")
    return 0


def _make_tiny_model(args) -> int:
    from qwen_image_lora.tiny_model import is_model_folder, make_tiny_model

    _note_kept(args, is_model_folder(args.output_dir), "a model")
    print(make_tiny_model(args.output_dir, seed=args.seed or 0, overwrite=args.overwrite))
    return 0


def _make_sample_data(args) -> int:
    from qwen_image_lora.sample_data import is_sample_data, make_sample_data

    _note_kept(args, is_sample_data(args.output_dir), "sample data")
    print(make_sample_data(args.output_dir, seed=args.seed or 0, overwrite=args.overwrite))
    return 0


def _note_kept(args, made: bool, what: str) -> None:
    """A --seed that will not be used is said, not ignored (a plain re-run, as the demo's, stays quiet)."""
    if made and not args.overwrite and args.seed is not None:
        print(f"note: {args.output_dir} holds {what} already, kept as it is; --overwrite writes it again with "
              f"--seed {args.seed}", file=sys.stderr)  # fmt: skip


class _CommandParser(argparse.ArgumentParser):
    """A (sub)command's parser, which records itself in the namespace it parses: an unknown option is then refused
    with that command's usage, not the top level's (nested `data` commands inherit the class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_defaults(command_parser=self)

    def error(self, message: str):
        """A value an option refuses is one line naming the option, as every other refusal is (`--steps 0` was one
        line, `--quality 101` the command's whole usage first); an unknown or missing argument keeps the usage."""
        if message.startswith("argument -"):
            self.exit(2, f"error: {message.removeprefix('argument ')} (`{self.prog} --help` lists the options)\n")
        super().error(message)


def refuse_unknown(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """argparse's 'unrecognized arguments', from the command's own parser, with the nearest option it takes."""
    options = sorted(set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", parser.format_help())))
    unknown = next((a.split("=", 1)[0] for a in extra if a.startswith("--")), "")
    close = difflib.get_close_matches(unknown, options, n=1, cutoff=0.6) if unknown else []
    parser.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {close[0]}?" if close else ""))


def version_line() -> str:
    """Ours and the libraries that decide what a run computes, as a bug report needs them (read without importing)."""
    libraries = []
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            libraries.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            libraries.append(f"{name} missing")
    return f"qwen-lora {__version__} ({', '.join(libraries)})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-lora", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    p = sub.add_parser("validate", help="check a config, the model folder and the data source (no weights loaded)")
    p.add_argument("target", nargs="?", metavar="config", help="the config (or give it as --config)")
    p.add_argument("--config", help="the config, as the other commands take it")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value")
    p.set_defaults(func=_validate, prepare=_one_config)

    sub.add_parser("make-tiny-model", help="write the tiny random Qwen-Image-2.1 checkpoint used by tests and the demo")
    sub.add_parser("make-sample-data", help="write the bundled synthetic brand and edit-pair data set")
    for name, what, func in (("make-tiny-model", "the model", _make_tiny_model),
                             ("make-sample-data", "the data", _make_sample_data)):  # fmt: skip
        p = sub.choices[name]
        p.add_argument("output_dir", help="a new or empty folder (one that holds anything else is refused)")
        p.add_argument("--seed", type=int, default=None, help="the random seed (default 0)")
        p.add_argument("--overwrite", action="store_true", help=f"write {what} again where it exists already")
        p.set_defaults(func=func)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a missing dependency inside the module is a real error
                raise
            continue
        module.register(sub)
    return parser


def _say_default_model(args) -> None:
    """A command given no config and no model runs the default hub model: say so before it starts (a download of
    tens of GB, or an error about a model the user never named, should not come as a surprise)."""
    target = getattr(args, "target", None)  # data doctor takes a config or a bare data folder
    config = getattr(args, "config", None) or (target if target and target.endswith((".yaml", ".yml")) else None)
    if hasattr(args, "target") and target is None and config is None:
        return  # data doctor given neither: its own error says what to give
    no_config = (hasattr(args, "config") or target is not None) and config is None
    named = (
        getattr(args, "model", None)
        or getattr(args, "from_image", None)  # --from: the image names its model
        or any(o.startswith("model.pretrained=") for o in getattr(args, "overrides", []))
    )
    if no_config and not named:
        other = "a config as the target" if target is not None else "--config CFG"  # data doctor has no --config
        print(
            f"note: no config given: using the default model {ModelConfig().pretrained} "
            f"({other} or model.pretrained=DIR picks another)",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a `nargs="*"` positional only the words right after the previous positional; overrides
    # written after later options (`batch jobs.jsonl --output-dir out model.dtype=float32`) arrive here.
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") or "=" not in a for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        refuse_unknown(getattr(args, "command_parser", parser), extra)
    try:
        if getattr(args, "prepare", None):  # a command's own first step (the base model an adapter trained on)
            args.prepare(args)
        _say_default_model(args)
        # A bad config or override is refused before the command imports torch (data doctor's target may be one).
        config = getattr(args, "config", None) or getattr(args, "target", "")
        if config and config.endswith((".yaml", ".yml")):
            load_config(config, getattr(args, "overrides", []))
        return args.func(args) or 0
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # mid-load, mid-render, mid-prepare: every write is atomic, so nothing is half-written
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))  # data prepare
        print(f"stopped (Ctrl-C) during {command}; no file is left half-written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qwen-lora data doctor ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's own flush fails again
        return 141  # as a shell reports a process that SIGPIPE ended
    except OSError as e:  # a full disk, a read-only or unwritable folder: the path and the next step, not a traceback
        if not is_write_error(e):
            raise
        print(f"error: {describe_write_error(e, e.filename or 'a file')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
