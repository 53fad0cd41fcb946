"""The inference commands' flags, built once: one flag per `SamplingConfig` field (its type, default, limits and
help), the model and adapter flags, and the batch job format `qwen-lora batch --help` prints."""

from __future__ import annotations

import argparse
import dataclasses

from qwen_image_lora.knobs import (
    MASK_FEATHER,
    MAX_ADAPTER_WEIGHT,
    MAX_INPUT_IMAGES,
    QUALITY,
    Bounded,
    SamplingConfig,
    accepted,
    flag,
    limits_of,
    spell_fields,
    type_of,
)

FLAG_ALIASES = {long: [f"--{short}"] for short, long in SamplingConfig.SHORT_NAMES.items()}
FROM_HELP = (
    "re-create an image from the settings written into it: they are the defaults (over --config's model and "
    "data.resolution), and the flags and key=value overrides given here win (a size or data.resolution given here "
    "replaces the recorded size); recorded inputs and adapters are used while their files keep the recorded sha256"
)


class Given(argparse.Action):
    """Stores the value and notes that the command line gave it, so `--from` can tell a typed `--seed 0` from the
    default, and how it was spelt, so a refusal names the option the user typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}
        namespace.typed = {**getattr(namespace, "typed", {}), self.dest: option_string}  # --steps, not its long name


def job_format() -> str:
    """What `qwen-lora batch --help` shows; `inference.jobs.read_jobs` checks each line against it. The sampling
    fields' lines come from `SamplingConfig`."""
    sampling = [f"  {f.name:<20}{field_help(f)}" for f in dataclasses.fields(SamplingConfig) if f.name != "seed"]
    return "\n".join([
        'jobs file: JSON Lines, one job per line; only "prompt" is required.',
        "  prompt              the text-to-image prompt or the edit instruction",
        (f"  images              input images for an edit (1 to {MAX_INPUT_IMAGES}), paths relative to the jobs "
         "file; omit for text-to-image"),
        ("  mask, mask_feather  masked edit of the last image: white = may change, black = kept exactly; soft edge "
         f"px, {MASK_FEATHER.low}-{MASK_FEATHER.high} ({MASK_FEATHER.default})"),
        "  id                  names the output (default: the line index, 000000, 000001, ...)",
        "  seed                default: --seed + the line index",
        *sampling,
        ('  loras               {"adapter name": weight} or [{"name": ..., "weight": ...}] (a missing weight: the '
         "--lora one); default: every --lora at its weight"),
        ("  output, quality     file name in --output-dir (.png, .jpg, .webp; default ID.png), JPEG/WebP quality "
         f"{QUALITY.low}-{QUALITY.high}, 100 a lossless WebP ({QUALITY.default})"),
        "example line:",
        ('  {"id": "sku-123", "prompt": "put it on white marble", "images": ["in/sku-123.jpg"], "seed": 7, '
         '"output": "sku-123.webp", "quality": 90}'),
    ]) + "\n"  # fmt: skip


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (the model comes from its `model` section)")
    p.add_argument("--model", help="hub id or local folder; overrides the config's model.pretrained")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the config's model.dtype")
    p.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
        help=f"repeatable; weight default 1.0, from -{MAX_ADAPTER_WEIGHT:g} to {MAX_ADAPTER_WEIGHT:g}",
    )  # fmt: skip


def ranged(knob: Bounded):
    """An argparse type: a whole number within `knob`'s limits (the ones the server's request models have)."""
    low, high = knob.low, knob.high

    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high} (got {text!r})")
        return int(text)

    return parse


def quality_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quality", type=ranged(QUALITY), default=QUALITY.default, action=Given, metavar="N",
                   help=f"{QUALITY.help}, {QUALITY.low}-{QUALITY.high}, 100 a lossless WebP (default {QUALITY.default}; "
                        "--from: the image's)")  # fmt: skip


def mask_args(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    p.add_argument("--mask", required=required, help=help)
    p.add_argument(
        "--mask-feather",
        type=ranged(MASK_FEATHER),
        default=MASK_FEATHER.default,
        metavar="PX",
        action=Given,
        help=f"{MASK_FEATHER.help}, {MASK_FEATHER.low}-{MASK_FEATHER.high} (default {MASK_FEATHER.default})",
    )


def overrides_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],  # without it argparse lists the optional overrides among the missing required arguments
        help="section.key=value applied to --config, e.g. data.resolution=768 (the "
        "pixel budget: images have ~RES^2 pixels, as in training) or model.dtype=float32",
    )


def sampling_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per `SamplingConfig` field (--field-name): type, default, help and choices from the dataclass; the
    values are checked by its rules (`validate`) before any model loads."""
    for f in dataclasses.fields(SamplingConfig):
        if f.name not in skip:
            kind, choices = type_of(SamplingConfig, f), limits_of(f).get("choices")
            flags = [flag(f.name), *FLAG_ALIASES.get(f.name, [])]
            p.add_argument(*flags, dest=f.name, type=kind, default=f.default, choices=choices, help=field_help(f, f.default, flag),
                           metavar=None if choices else {int: "N", float: "X"}.get(kind, "TEXT"), action=Given)  # fmt: skip


def field_help(f: dataclasses.Field, default=None, spell=str) -> str:
    """A sampling field's help text and what it accepts, from its declaration; `spell` writes the fields it names."""
    text = "; ".join(filter(None, [spell_fields(f.metadata["help"], f.metadata["mentions"], spell), accepted(f)]))
    return text if default is None else f"{text} (default {default})"
