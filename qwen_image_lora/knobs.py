"""Settings that every edge shares (`config.SamplingConfig`), each rule stated once.

A field made with `knob` carries its help text and its limits in its metadata. `check_value` enforces the limits for
configs, batch lines, CLI flags and the generator; the edges read the same metadata to build their own forms (the
argparse flags in `inference/cli.py`, the request models in `inference/server.py`), so a limit is written once and a
refusal names the same field everywhere. Also the one rule on how many input images an edit takes.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field

from qwen_image_lora.errors import InputError

MAX_INPUT_IMAGES = 10  # reference images per edit: the model's limit (training data, configs and every edge)


# Limits whose values are the model module's (deferred: it imports torch; this module stays light to import).
def aspect_ratios() -> tuple[str, ...]:
    from qwen_image_lora.model import ASPECT_RATIOS  # noqa: PLC0415 - the config stays light (model imports torch)

    return tuple(ASPECT_RATIOS)


def side_multiple() -> int:
    from qwen_image_lora.model import SIDE_MULTIPLE  # noqa: PLC0415 - the config stays light (model imports torch)

    return SIDE_MULTIPLE


class SettingError(InputError):
    """A value that breaks a setting's rule. `field` names it (None: a combination of fields); str() is
    'field: message', which each edge turns into its own form (a config's dotted name, a 422's loc)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message


def knob(default, help: str, **limits):
    """A settings field. `help` describes its CLI flag and request field; `limits` (ge, le, multiple_of, choices)
    are checked by `check_value` and become a request model's constraints. A limit whose value lives in a heavy
    module (the model's presets) is given as a function, called when the limit is used."""
    return field(default=default, metadata={"help": help, "limits": limits})


def limits_of(f: dataclasses.Field) -> dict:
    return {k: v() if callable(v) else v for k, v in f.metadata.get("limits", {}).items()}


def type_of(cls: type, f: dataclasses.Field) -> type:
    """The type of `f`'s values in `cls`, without the `| None` (int, float or str)."""
    hint = typing.get_type_hints(cls)[f.name]
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def accepted(f: dataclasses.Field) -> str:
    """What `f` accepts, in words, from its limits (for help texts and refusals); "" without limits."""
    limits = limits_of(f)
    if "choices" in limits:
        return f"one of {', '.join(limits['choices'])}"
    ge, le, step = limits.get("ge"), limits.get("le"), limits.get("multiple_of")
    if step and ge == step and le is None:
        return f"a positive multiple of {step}"
    parts = [f"a multiple of {step}"] if step else []
    parts += [f">= {ge}"] if ge is not None else []
    parts += [f"<= {le}"] if le is not None else []
    return " and ".join(parts)


def check_value(f: dataclasses.Field, value) -> None:
    """Raise SettingError naming `f` when `value` breaks its limits (None passes: it means the default)."""
    if value is None:
        return
    limits = limits_of(f)
    if "choices" in limits:
        if value not in limits["choices"]:
            raise SettingError(f.name, f"{accepted(f)} (got {value!r})")
        return
    if isinstance(value, float) and not math.isfinite(value):  # argparse's float() takes "nan"
        raise SettingError(f.name, f"must be a finite number (got {value})")
    ge, le, step = limits.get("ge"), limits.get("le"), limits.get("multiple_of")
    if (ge is not None and value < ge) or (le is not None and value > le) or (step and value % step):
        raise SettingError(f.name, f"must be {accepted(f)} (got {value})")


def check_image_count(count: int, least: int = 0, field: str = "images") -> None:
    """The one rule on an edit's inputs: at most MAX_INPUT_IMAGES (and at least `least`: 1 where an edit is required;
    0 lets a request be text-to-image)."""
    if not least <= count <= MAX_INPUT_IMAGES:
        raise SettingError(field, f"give 1 to {MAX_INPUT_IMAGES} input images (got {count})")
