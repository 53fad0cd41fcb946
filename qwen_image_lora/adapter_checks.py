"""The checks of the adapter-format component (`adapter_format.py`): an adapter's weights agree with the config
stored beside them, and fit the transformer they are loaded into. Each refusal is one AdapterError naming every
misfit (the first three in full), before peft builds a layer."""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from qwen_image_lora.errors import AdapterError

MAX_ALPHA = 10_000.0  # an alpha (a kohya/ComfyUI file's, or a config's) beyond any training's: its scale is noise
_CONFIG_KEYS = {f.name for f in dataclasses.fields(LoraConfig)}


def check_config(state_dict: dict[str, torch.Tensor], config: dict, where: str = "adapter") -> None:
    """The weights agree with the config stored beside them (the file's metadata or adapter_config.json): every lora_A
    has its lora_B and the other way round, each lora_A is 2-D with the rank `r` / `rank_pattern` gives, and
    `use_dora` comes with DoRA magnitudes. peft builds its layers from the config and then loads the weights, so a
    mismatch was its size-mismatch traceback for every module, and a DoRA config without magnitudes a page of missing
    keys."""
    _check_values(config, where)
    problems = []
    for key in sorted(k for k in state_dict if k.endswith((".lora_A.weight", ".lora_B.weight"))):
        # half a pair: peft kept a random lora_A where the file had none (a wrong image, exit 0), export crashed
        mine, other = (".lora_A.", ".lora_B.") if ".lora_A." in key else (".lora_B.", ".lora_A.")
        if key.replace(mine, other) not in state_dict:
            module = key[len("transformer.") : -len(".lora_A.weight")]
            problems.append(f"module {module!r}: {mine.strip('.')} without {other.strip('.')}")
    for key in sorted(k for k in state_dict if k.endswith(".lora_A.weight")):
        module, a = key[len("transformer.") : -len(".lora_A.weight")], state_dict[key]
        if a.dim() != 2 or a.shape[0] == 0:
            problems.append(f"module {module!r}: lora_A is {list(a.shape)}, not a matrix of rank 1 or more")
        elif "r" in config and a.shape[0] != (
            rank := pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        ):
            problems.append(f"module {module!r}: lora_A has rank {a.shape[0]}, its config says r={rank}")
    if config.get("use_dora") and not any(k.endswith(".lora_magnitude_vector") for k in state_dict):
        problems.append("its config says use_dora but it holds no DoRA magnitudes (lora_magnitude_vector)")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterError(
            f"{where}: its weights do not match its own config: " + "; ".join(problems[:3]) + more
            + "; save the weights and the config from one training run"
        )  # fmt: skip


def _check_values(config: dict, where: str) -> None:
    """The config's own values, each of the type and range peft needs: a wrong one was peft's traceback at load
    (a string alpha, a list for rank_pattern, a bad regex, dropout 5), or a NaN or huge alpha a blank image."""

    def number(value, whole: bool = False) -> bool:
        kinds = (int,) if whole else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)

    def refuse(what: str):
        raise AdapterError(f"{where}: its config's {what}; save the weights and the config from one training run")

    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        refuse(
            f"{', '.join(unknown)}: not {'a peft LoraConfig setting' if len(unknown) == 1 else 'peft LoraConfig settings'}"
        )
    if "r" in config and not (number(r := config["r"], whole=True) and r > 0):
        refuse(f"r is {r!r}, not a whole number above 0")
    if "lora_alpha" in config and not (number(alpha := config["lora_alpha"]) and 0 < alpha <= MAX_ALPHA):
        refuse(f"lora_alpha is {alpha!r}, not a number above 0 and at most {MAX_ALPHA:g}")
    if "lora_dropout" in config and not (number(dropout := config["lora_dropout"]) and 0 <= dropout < 1):
        refuse(f"lora_dropout is {dropout!r}, not a number from 0 to under 1")
    for name, whole, high in (("rank_pattern", True, math.inf), ("alpha_pattern", False, MAX_ALPHA)):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            refuse(f"{name} is {pattern!r}, not a mapping of module patterns to numbers")
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                refuse(f"{name} key {key!r} is not a regular expression ({e})")
            if not (number(value, whole) and 0 < value <= high):
                refuse(f"{name}[{key!r}] is {value!r}, not a number above 0")


def check_shapes(state_dict: dict[str, torch.Tensor], transformer, where: str = "adapter", next_step: str = "") -> None:
    """Every lora_A/lora_B pair (and DoRA magnitude) must name an existing Linear and match its in/out features;
    `next_step` ends the refusal."""
    problems = []
    for key in sorted(state_dict):
        if not key.endswith(".lora_A.weight"):
            continue
        module_name = key[len("transformer.") : -len(".lora_A.weight")]
        a = state_dict[key]
        b = state_dict.get(key.replace(".lora_A.", ".lora_B."))
        magnitude = state_dict.get(key.replace(".lora_A.weight", ".lora_magnitude_vector"))
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            problems.append(f"module {module_name!r} does not exist in this transformer")
            continue
        base = getattr(module, "base_layer", module)  # a module that already carries another adapter
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"module {module_name!r} is {type(base).__name__}, not a Linear layer")
            continue
        if b is None:  # half a pair: `check_config`'s refusal
            continue
        want_a, want_b = (a.shape[0], base.in_features), (base.out_features, a.shape[0])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"module {module_name!r} is Linear(in={base.in_features}, out={base.out_features}) but the adapter has "
                f"lora_A {list(a.shape)} and lora_B {list(b.shape)} (expected {list(want_a)} and {list(want_b)})"
            )
        if magnitude is not None and magnitude.numel() != base.out_features:
            problems.append(
                f"module {module_name!r}: DoRA magnitude of {magnitude.numel()}, expected {base.out_features}"
            )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterError(
            f"{where}: does not fit this transformer — made for another model? "
            + "; ".join(problems[:3])
            + more
            + next_step
        )


def pattern_value(pattern: dict, name: str, default):
    """`name`'s entry in a rank_pattern / alpha_pattern, matched as peft matches it (a key is a regex of the name's
    tail)."""
    return pattern.get(get_pattern_key(list(pattern), name), default)
