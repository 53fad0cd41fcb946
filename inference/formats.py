"""Adapter files in, one diffusers-format state dict out — checked against the transformer before anything loads.

Accepted layouts (detected from the keys, never from the file name):

    ours / diffusers        transformer.<module>.lora_A.weight, lora_B.weight; rank and alpha in the safetensors
                            metadata (`pytorch_lora_weights.safetensors`, as `save_lora_weights` writes it; the
                            diffusers example scripts write the same)
    peft save_pretrained    base_model.model.<module>.lora_A.weight + adapter_config.json beside it
    ComfyUI                 diffusion_model.<module>.lora_A/lora_B or lora_down/lora_up (+ .alpha)
    kohya / musubi-tuner    lora_unet_<module_with_underscores>.lora_down/lora_up/.alpha

diffusers' own converter (`QwenImage21Pipeline.lora_state_dict`, i.e. `_convert_non_diffusers_qwen_lora_to_diffusers`)
does the lora_down/up -> lora_A/B renaming and folds `alpha / rank` into the weights. We write by hand only what
it does not handle for Qwen-Image-2.1: kohya's flattened module names. Its table targets Qwen-Image 1's modules
(it turns `img_mlp_gate_layer` into `img_mlp.gate.layer` and misses `txt_in_in_layer`, `modulation_1`), so we
unflatten against the names the loaded transformer actually has.

A file made for another model fails here, naming the module and both shapes; nothing is ever silently skipped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
_PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.")
_UNSUPPORTED = {"lokr_": "LoKr", "hada_": "LoHa", ".diff": "full-weight diff", "lora_te": "text-encoder LoRA"}
_KOHYA = re.compile(r"^lora_unet_(?P<module>[A-Za-z0-9_]+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


class AdapterError(ValueError):
    """An adapter that cannot be applied to this transformer: wrong model, wrong format, missing file."""


@dataclasses.dataclass
class AdapterWeights:
    state_dict: dict[str, torch.Tensor]  # diffusers layout: transformer.<module>.lora_A.weight / lora_B.weight
    metadata: dict | None  # transformer.-prefixed LoraConfig kwargs (r, lora_alpha, ...) or None (alpha folded in)
    source: str
    layout: str  # "diffusers", "peft", "comfyui" or "kohya"


def resolve_file(source: str | Path) -> Path:
    """A .safetensors file, a folder holding one, or a hub id (`owner/repo` or `owner/repo/file.safetensors`)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        listed = ", ".join(p.name for p in found) or "none"
        raise AdapterError(f"{path}: expected {WEIGHT_NAMES[0]} or exactly one .safetensors file (found: {listed})")
    if re.fullmatch(r"[\w.-]+/[\w.-]+(/.+\.safetensors)?", str(source)) and not str(source).startswith((".", "/")):
        return _download(str(source))
    raise AdapterError(f"{source}: no such adapter file or folder (and not a hub id like owner/repo)")


def _download(hub_id: str) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    parts = hub_id.split("/")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        if file is None:
            files = [f for f in list_repo_files(repo) if f.endswith(".safetensors")]
            file = next((n for n in WEIGHT_NAMES if n in files), files[0] if len(files) == 1 else None)
            if file is None:
                raise AdapterError(f"{hub_id}: name the file, e.g. {repo}/<file>.safetensors (found {files})")
        return Path(hf_hub_download(repo, file))
    except AdapterError:
        raise
    except Exception as e:  # offline, missing repo, auth: say which adapter
        raise AdapterError(f"{hub_id}: could not fetch the adapter from the hub: {e}") from e


def read_adapter(source: str | Path, transformer, pipeline_cls) -> AdapterWeights:
    """Read, convert and check an adapter against `transformer`. Raises AdapterError naming what does not fit."""
    from safetensors import safe_open

    file = resolve_file(source)
    if file.suffix != ".safetensors":
        raise AdapterError(f"{file}: only .safetensors adapters are loaded (pickled .bin/.pt files can run code)")
    with safe_open(str(file), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
        file_meta = f.metadata() or {}
    metadata = json.loads(file_meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in file_meta else None
    if metadata is None and (file.parent / "adapter_config.json").is_file():
        metadata = _peft_config_metadata(file.parent / "adapter_config.json")
    module_names = {name for name, _ in transformer.named_modules()}
    state_dict, layout = convert(raw, module_names, pipeline_cls, str(file))
    check_shapes(state_dict, transformer, str(file))
    return AdapterWeights(state_dict, metadata, str(file), layout)


def convert(raw: dict[str, torch.Tensor], module_names: set[str], pipeline_cls, where: str = "adapter"):
    """Any supported layout -> (`transformer.<module>.lora_A.weight` state dict, layout name)."""
    if not raw:
        raise AdapterError(f"{where}: the file holds no tensors")
    for marker, kind in _UNSUPPORTED.items():
        bad = next((k for k in raw if marker in k), None)
        if bad is not None:
            raise AdapterError(f"{where}: {kind} weights ({bad!r}) are not supported; only LoRA (lora_A/B, lora_down/up)")
    if any("dora_scale" in k for k in raw):
        raise AdapterError(f"{where}: DoRA adapters are not supported by the diffusers loader")

    if any(k.startswith("lora_unet_") for k in raw):
        layout, relative = "kohya", _unflatten_kohya(raw, module_names, where)
    else:
        layout, relative = "diffusers", {}
        for key, value in raw.items():
            prefix = next((p for p in _PREFIXES if key.startswith(p)), "")
            layout = {"base_model.model.": "peft", "diffusion_model.": "comfyui", "model.diffusion_model.": "comfyui"}.get(
                prefix, layout
            )
            relative[key[len(prefix) :]] = value
    # One spelling for diffusers' converter: it strips `diffusion_model.`, renames lora_down/up, folds alpha/rank
    # into the weights and prefixes `transformer.`.
    try:
        converted = pipeline_cls.lora_state_dict({f"diffusion_model.{k}": v for k, v in relative.items()})
    except ValueError as e:
        raise AdapterError(f"{where}: not a LoRA state dict diffusers can read ({e})") from e
    if not any(k.endswith("lora_A.weight") for k in converted):
        raise AdapterError(f"{where}: no LoRA weights found (keys look like {sorted(raw)[:3]})")
    return converted, layout


def _unflatten_kohya(raw, module_names: set[str], where: str) -> dict[str, torch.Tensor]:
    """`lora_unet_transformer_blocks_0_img_mlp_gate_layer.lora_down.weight` -> `transformer_blocks.0.img_mlp.gate_layer...`
    by matching against the transformer's real module names (unambiguous: no two names flatten alike)."""
    table = {name.replace(".", "_"): name for name in module_names if name}
    out = {}
    for key, value in raw.items():
        m = _KOHYA.match(key)
        if m is None:
            raise AdapterError(f"{where}: unexpected key {key!r} in a kohya-style (lora_unet_) adapter")
        module = table.get(m["module"])
        if module is None:
            raise AdapterError(
                f"{where}: module {m['module']!r} (from {key!r}) does not exist in this transformer; "
                "the adapter was made for another model"
            )
        out[f"{module}.{m['part']}"] = value
    return out


def check_shapes(state_dict: dict[str, torch.Tensor], transformer, where: str = "adapter") -> None:
    """Every lora_A/lora_B pair must name an existing Linear and match its in/out features."""
    problems = []
    for key in sorted(state_dict):
        if not key.endswith(".lora_A.weight"):
            continue
        module_name = key[len("transformer.") : -len(".lora_A.weight")]
        a = state_dict[key]
        b = state_dict.get(key.replace(".lora_A.", ".lora_B."))
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            problems.append(f"module {module_name!r} does not exist in this transformer")
            continue
        base = getattr(module, "base_layer", module)  # a module that already carries another adapter
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"module {module_name!r} is {type(base).__name__}, not a Linear layer")
            continue
        if b is None:
            problems.append(f"module {module_name!r}: lora_A without lora_B")
            continue
        want_a, want_b = (a.shape[0], base.in_features), (base.out_features, a.shape[0])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"module {module_name!r} is Linear(in={base.in_features}, out={base.out_features}) but the adapter has "
                f"lora_A {list(a.shape)} and lora_B {list(b.shape)} (expected {list(want_a)} and {list(want_b)})"
            )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterError(
            f"{where}: does not fit this transformer — made for another model? " + "; ".join(problems[:3]) + more
        )


def _peft_config_metadata(path: Path) -> dict:
    """peft's adapter_config.json -> the transformer.-prefixed LoraConfig kwargs diffusers' loader takes."""
    from peft import LoraConfig

    config = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type", "task_type", "base_model_name_or_path", "revision"}
    return {f"transformer.{k}": v for k, v in config.items() if k in known}
