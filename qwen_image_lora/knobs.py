"""The sampling-settings type every edge shares (`SamplingConfig`: validation, eval, batch lines, CLI flags, HTTP
requests) and its machinery, each rule stated once.

A field made with `knob` carries its help text and its limits in its metadata. `check_value` enforces the limits for
configs, batch lines, CLI flags and the generator; the edges read the same metadata to build their own forms (the
argparse flags in `inference/cli.py`, the request models in `inference/server.py`), so a limit is written once and a
refusal names the same field everywhere. Also the one rule on how many input images an edit takes, and the
rules every edge applies to adapter names (no '.', none given twice).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qwen_image_lora.errors import InputError
from qwen_image_lora.presets import ASPECT_RATIOS, MAX_SIDE, SIDE_MULTIPLE
from qwen_image_lora.typed_yaml import ConfigError

MAX_INPUT_IMAGES = 10  # reference images per edit: the model's limit (training data, configs and every edge)
SIZE_FIELDS = ("aspect_ratio", "width", "height")


# Limits of the per-request values outside `SamplingConfig`, one home for every edge: CLI flags, batch lines, the
# server's request models and `serve.adapters` check against them.
MAX_ADAPTER_WEIGHT = 4.0  # |weight| of one adapter; beyond it a LoRA only adds noise
# The flow-matching schedule has 1,000 training timesteps: more steps revisit them (and 10^20 was a numpy traceback
# after the model loaded). A guidance scale far past the useful ~1-10 overflows to NaN: a black, transparent image
# that was written and counted as a success.
MAX_STEPS = 1000
MAX_GUIDANCE_SCALE = 100.0


@dataclass(frozen=True)
class Bounded:
    """A whole-number request value outside `SamplingConfig`: its default, limits and help, read by every edge."""

    default: int
    low: int
    high: int
    help: str

    def check(self, field: str, value) -> None:
        """Raise SettingError naming `field` unless `value` is a whole number within the limits (True is not 1)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not self.low <= value <= self.high:
            raise SettingError(field, f"must be a whole number from {self.low} to {self.high} (got {value!r})")


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit number
QUALITY = Bounded(95, 1, 100, "JPEG/WebP quality")
BATCH_SEED = Bounded(0, 0, MAX_SEED, "seed of job i without its own seed: SEED + i")
MASK_FEATHER = Bounded(8, 0, 64, "soft edge inside the changed region, in pixels")
# What `layers` asks of the background when no prompt is given (its CLI help, the API and the generator say the same)
DEFAULT_BACKGROUND_PROMPT = "remove the object and fill in the background"
GUIDANCE_UNUSED = "guidance_scale acts only with a negative_prompt (Qwen-Image 2.1 samples without guidance)"
NEGATIVE_UNUSED = "negative_prompt acts only with a guidance_scale above 1 (the pipeline's default is 1.0: no guidance)"
PIPELINE_GUIDANCE = 1.0  # QwenImage21Pipeline's true_cfg_scale default (the generator reads it from the signature)


def unused_settings(given: set[str], lossless: bool, masked: bool) -> dict[str, str]:
    """Settings given that change nothing in this request, each with why: every edge says so (a CLI note, an HTTP
    x-warning, a batch note) rather than silently recording them in the image's settings."""
    unused = {}
    if "quality" in given and lossless:
        unused["quality"] = "applies to JPEG and WebP outputs; a PNG is lossless"
    if "mask_feather" in given and not masked:
        unused["mask_feather"] = "applies only to a masked edit (with a mask)"
    return unused


class SettingError(InputError):
    """A value that breaks a setting's rule. `field` names it (None: a combination of fields); str() is
    'field: message', which each edge turns into its own form (a config's dotted name, a 422's loc). `mentions` are
    the other fields the message names, which `spelled` writes as the edge does (the CLI's --aspect-ratio)."""

    def __init__(self, field: str | None, message: str, mentions: tuple[str, ...] = ()):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message, self.mentions = field, message, mentions

    def spelled(self, spell: typing.Callable[[str], str]) -> str:
        message = spell_fields(self.message, self.mentions, spell)
        return f"{spell(self.field)}: {message}" if self.field else message


def flag(name: str) -> str:
    """A field's command-line spelling: aspect_ratio -> --aspect-ratio."""
    return "--" + name.replace("_", "-")


def spell_fields(text: str, names: typing.Iterable[str], spell: typing.Callable[[str], str]) -> str:
    """`text` with each of the field names it mentions, as a whole word, spelled by `spell`."""
    for name in names:
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", lambda _, name=name: spell(name), text)
    return text


def knob(default, help: str, mentions: tuple[str, ...] = (), **limits):
    """A settings field. `help` describes its CLI flag and request field (naming the fields in `mentions`, which each
    edge spells its own way); `limits` (ge, le, multiple_of, choices) are checked by `check_value` and become a
    request model's constraints."""
    return field(default=default, metadata={"help": help, "mentions": mentions, "limits": limits})


def limits_of(f: dataclasses.Field) -> dict:
    return dict(f.metadata.get("limits", {}))  # a copy: the server narrows it to its own bounds


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
    if step and ge == step:
        return f"a positive multiple of {step}" + (f" up to {le}" if le is not None else "")
    parts = [f"a multiple of {step}"] if step else []
    parts += [f">= {ge}"] if ge is not None else []
    parts += [f"<= {le}"] if le is not None else []
    return " and ".join(parts)


# What a field's type accepts, in words; numpy's numbers count (numbers.Integral, numbers.Real), True does not.
_KINDS = {int: (numbers.Integral, "a whole number"), float: (numbers.Real, "a number"), str: (str, "text")}


def check_type(cls: type, f: dataclasses.Field, value) -> None:
    """Raise SettingError naming `f` when `value` is not of its type: the Python API rendered
    `num_inference_steps=True` and crashed inside torch on 1.5 or "3", where every other edge refuses them."""
    accepted_type, words = _KINDS.get(type_of(cls, f), (object, ""))
    if value is not None and (isinstance(value, bool) or not isinstance(value, accepted_type)):
        raise SettingError(f.name, f"must be {words} (got {value!r})")


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


def check_range(field: str, value, low, high) -> None:
    """Raise SettingError naming `field` unless `value` is a finite number in [low, high]."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise SettingError(field, f"must be a number from {low} to {high} (got {value})")


def check_adapter_weight(field: str, weight) -> None:
    check_range(field, weight, -MAX_ADAPTER_WEIGHT, MAX_ADAPTER_WEIGHT)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` -> (path, weight). A trailing `:number` is the weight; other colons stay in the path."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            if Path(head).expanduser().exists() and not Path(text).expanduser().exists():  # run:abc, not a path
                raise SettingError("--lora", f"{text}: the weight after ':' must be a number (got {tail!r})") from None
            return text, 1.0
        try:
            check_adapter_weight("--lora", weight)  # a NaN weight renders a black, transparent image
        except SettingError as e:  # which of several --lora it is
            raise SettingError("--lora", f"{text}: the weight {e.message}") from None
        return head, weight
    return text, 1.0


def check_adapter_name(field: str, name: str) -> None:
    """peft keys each adapter's layers by its name, so the name must be a module name: not empty, no '.'. Raises
    SettingError naming `field` and a name that would do."""
    if not name or "." in name:
        fix = (name or "adapter").replace(".", "_")
        raise SettingError(
            field, f"no '.' in a name (peft keys an adapter's layers by it) and not empty (got {name!r}); e.g. {fix!r}"
        )


def repeated_name(names: typing.Iterable[str]) -> tuple[int, str] | None:
    """(position, name) of the first name given again, reading in order; None when each is given once. Every edge
    refuses an adapter named twice: a name -> weight mapping would keep the last weight silently."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            return i, name
        seen.add(name)
    return None


def adapter_name_for(source: str | Path) -> str:
    """A default name: the folder name, or the file stem unless it is a generic weight file name; a checkpoint's
    adapter goes by its step (two of a run's checkpoints were "adapter" and "adapter-2" in an eval report); a "."
    (which peft's module names can't hold: style-v1.5) becomes "_"."""
    path = Path(str(source).rstrip("/"))
    if path.suffix == ".safetensors" and path.stem in ("pytorch_lora_weights", "adapter_model") and path.parent.name:
        path = path.parent
    name = path.stem if path.suffix == ".safetensors" else path.name
    if name == "adapter" and path.parent.name.startswith("step-"):  # RUN/checkpoints/step-000010/adapter
        name = path.parent.name
    return name.replace(".", "_")


def unique_name(stem: str, taken) -> str:
    return next(name for i in itertools.count(1) if (name := stem if i == 1 else f"{stem}-{i}") not in taken)


def derived_names(sources: list[str]) -> list[str]:
    """The names `Adapters.load` gives these sources, loaded in this order without names."""
    names: list[str] = []
    for source in sources:
        names.append(unique_name(adapter_name_for(source), names))
    return names


def check_image_count(count: int, least: int = 0, field: str = "images") -> None:
    """The one rule on an edit's inputs: at most MAX_INPUT_IMAGES (and at least `least`: 1 where an edit is required;
    0 lets a request be text-to-image)."""
    if not least <= count <= MAX_INPUT_IMAGES:
        allowed = f"{least} to {MAX_INPUT_IMAGES}" if least else f"at most {MAX_INPUT_IMAGES}"
        raise SettingError(field, f"give {allowed} input images (got {count})")


def check_masked_size(settings) -> None:
    """A masked edit keeps its image's size: a size given with a mask is refused (it was taken and ignored)."""
    if settings.aspect_ratio or settings.width or settings.height:
        raise SettingError("mask", "a masked edit keeps its image's size; drop aspect_ratio, width and height",
                           SIZE_FIELDS)  # fmt: skip


@dataclass(kw_only=True)
class SamplingConfig:
    """The knobs of one generation, each declared once with its help and limits: validation, eval and batch jobs
    carry these fields, and the CLI flags and the server's request models are built from them (`GenerationRequest`
    extends it). null = the pipeline's own defaults, the ones users get."""

    # Shorter names users already write: a CLI flag (--steps), and the "did you mean" of a batch line or request.
    SHORT_NAMES: typing.ClassVar[dict[str, str]] = {"steps": "num_inference_steps"}

    negative_prompt: str | None = knob(None, "what to steer away from; guidance acts only with one")
    width: int | None = knob(
        None, "width in pixels (or aspect_ratio)", ("aspect_ratio",), ge=SIDE_MULTIPLE, le=MAX_SIDE,
        multiple_of=SIDE_MULTIPLE,
    )  # fmt: skip
    height: int | None = knob(
        None, "height in pixels (or aspect_ratio)", ("aspect_ratio",), ge=SIDE_MULTIPLE, le=MAX_SIDE,
        multiple_of=SIDE_MULTIPLE,
    )  # fmt: skip
    # Quote it in YAML ("16:9"), or YAML reads a number.
    aspect_ratio: str | None = knob(
        None, "a preset size for the pixel budget (or width/height)", ("width", "height"), choices=tuple(ASPECT_RATIOS)
    )
    num_inference_steps: int | None = knob(None, "denoising steps; default: the pipeline's own", ge=1, le=MAX_STEPS)
    guidance_scale: float | None = knob(
        None, "true_cfg_scale: acts only with a negative prompt and > 1", ge=0.0, le=MAX_GUIDANCE_SCALE
    )
    seed: int = knob(0, "the noise seed: the same seed and settings give the same image", ge=0, le=MAX_SEED)

    def guidance_unused(self) -> bool:
        """A guidance scale given that acts on nothing: guidance needs a negative prompt (the edges say so; the
        generator renders without it)."""
        return self.negative_prompt is None and (self.guidance_scale or 0) > 1

    def negative_unused(self) -> bool:
        """A negative prompt given with no guidance to act on it: the scale omitted (the pipeline's 1.0) or <= 1. It
        rendered the image of no negative prompt, and no edge said so (the studio set guidance 4 by itself)."""
        scale = PIPELINE_GUIDANCE if self.guidance_scale is None else self.guidance_scale
        return self.negative_prompt is not None and scale <= 1

    def unused_said(self) -> list[str]:
        """What this request gives that acts on nothing, in words: each edge says it once."""
        return [text for text, unused in ((GUIDANCE_UNUSED, self.guidance_unused()),
                                          (NEGATIVE_UNUSED, self.negative_unused())) if unused]  # fmt: skip

    def quieted(self) -> dict:
        """Overrides that drop what acts on nothing, once an edge has said so: the generator need not say it again,
        and the image records what acted."""
        if self.negative_unused():
            return {"negative_prompt": None, "guidance_scale": None}
        return {"guidance_scale": None} if self.guidance_unused() else {}

    def check(self) -> None:
        """The sampling rules, once for every edge (config sections, batch lines, CLI flags, HTTP requests, the
        generator): each field within its limits, the size given one way. Raises SettingError naming the field."""
        for f in dataclasses.fields(SamplingConfig):
            check_type(SamplingConfig, f, getattr(self, f.name))
            check_value(f, getattr(self, f.name))
        if self.aspect_ratio is not None and (self.width is not None or self.height is not None):
            # Named on aspect_ratio: a field-less refusal was a 422 at `body` alone, "Value error, " prefixed.
            raise SettingError("aspect_ratio", "give it or width/height, not both", ("width", "height"))

    def validate(self, where: str) -> None:
        try:
            self.check()
        except SettingError as e:
            raise ConfigError(f"{where}.{e}" if e.field else f"{where}: {e}") from None
