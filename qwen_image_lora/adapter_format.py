"""Adapter files, the one home for their layouts: find, read, convert, check and write, with one error type.

Read (detected from the keys, never from the file name), everything converted to diffusers' layout
(`transformer.<module>.lora_A.weight`, `.lora_B.weight`, and `.lora_magnitude_vector` for DoRA):

    ours / diffusers     transformer.<module>.lora_A/lora_B (+ lora_magnitude_vector under DoRA); the peft config in
                         the safetensors header (`pytorch_lora_weights.safetensors`, as `save_lora_weights` writes it)
    peft                 base_model.model.<module>.lora_A/lora_B + adapter_config.json beside the file
    ComfyUI              diffusion_model.<module>.lora_down/lora_up (+ .alpha); its fused img_mlp.gate_up is split
    ai-toolkit           diffusion_model.<module>.lora_A/lora_B (+ .alpha)
    kohya / musubi       lora_unet_<module_with_underscores>.lora_down/lora_up/.alpha

diffusers' converter (the pipeline's `lora_state_dict`) renames lora_down/up and folds alpha / rank into the
weights (the result then has scale 1 and no config). Its kohya table targets Qwen-Image 1's modules, so kohya
names are unflattened here against the transformer's real module names.

Written: diffusers (`write_diffusers`) and ComfyUI (`write_comfyui`). ComfyUI's Qwen-Image key map is the identity
over its own state dict (`diffusion_model.X.weight` is patched by `X`, `transformer.X`, `lycoris_X` or `lora_unet_X`
with dots as underscores), and its Qwen-Image-2.1 model fuses the two halves of each SwiGLU MLP into one linear, so the
export fuses their LoRAs as reading splits them (`comfy_mlp.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from huggingface_hub import constants, hf_hub_download, list_repo_files, snapshot_download
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwen_image_lora import model as qmodel
from qwen_image_lora.adapter_checks import MAX_ALPHA, check_config, check_shapes, pattern_value
from qwen_image_lora.comfy_mlp import fuse_mlp, fused_names, split_fused_mlp
from qwen_image_lora.config import DEFAULT_MODEL
from qwen_image_lora.errors import AdapterError
from qwen_image_lora.hub import (
    WEIGHT_NAMES,
    check_adapter_file,
    check_adapter_hub,
    check_source,
    is_hub_id,
    local_weights_file,
    transformer_config_json,
)
from qwen_image_lora.io import atomic_path, content_hash
from qwen_image_lora.run_layout import FINAL_ADAPTER, trained_config

WEIGHTS_NAME = FINAL_ADAPTER  # diffusers' LoRA file name; the run layout, which imports nothing heavy, holds it
COMFYUI_NAME = "comfyui_lora.safetensors"
_PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.")
# Key patterns of what is not LoRA. A full-weight diff is a `.diff`/`.diff_b` suffix: a bare ".diff" substring would
# also match the supported `model.diffusion_model.` prefix.
_UNSUPPORTED = {
    re.compile(r"lokr_"): "LoKr",
    re.compile(r"hada_"): "LoHa",
    re.compile(r"\.diff(_b)?$"): "full-weight diff",
    re.compile(r"^lora_te"): "text-encoder LoRA",
}
_KOHYA = re.compile(r"^lora_unet_(?P<module>[A-Za-z0-9_]+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float8 has no isfinite, no matmul
_DIFFUSERS_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")

EXPORT_MARK = "qwen_image_lora_export"  # in the header of the files `qwen-lora export` writes

DORA_TO_COMFYUI = (
    "export --format comfyui: DoRA adapters cannot be exported exactly. peft's DoRA scales each output row by "
    "m / ||W + dW||, ComfyUI's weight_decompose by dora_scale / ||W|| (the base weight's norm): a matching dora_scale "
    "would depend on the exact base weights (and the dtype ComfyUI loads them in) and still differ at any strength "
    "other than 1. Use the diffusers file (pytorch_lora_weights.safetensors) or train without lora.use_dora."
)


@dataclasses.dataclass
class AdapterWeights:
    state_dict: dict[str, torch.Tensor]  # diffusers layout: transformer.<module>.lora_A.weight / lora_B.weight
    metadata: dict | None  # transformer.-prefixed LoraConfig kwargs (r, lora_alpha, ...) or None (alpha folded in)
    source: str
    layout: str  # "diffusers", "peft", "comfyui", "ai-toolkit" or "kohya"

    @property
    def config(self) -> dict:
        """The LoraConfig kwargs without the `transformer.` prefix ({} when the file had none)."""
        return {k.removeprefix("transformer."): v for k, v in (self.metadata or {}).items()}


# ------------------------------------------------------------------------------------------ finding the file


def resolve_file(source: str | Path) -> Path:
    """A .safetensors file, a folder holding one, or a hub id (`owner/repo` or `owner/repo/file.safetensors`)."""
    check_source(source)
    return local_weights_file(source) if Path(source).expanduser().exists() else _download(str(source))


def _repo_weight_files(repo: str) -> list[str]:
    """The repo's .safetensors files: listed by the hub, or offline (HF_HUB_OFFLINE) those of its cached snapshot."""

    if constants.HF_HUB_OFFLINE:
        folder = Path(snapshot_download(repo, local_files_only=True))
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    return [f for f in list_repo_files(repo) if f.endswith(".safetensors")]


def _download(hub_id: str) -> Path:

    check_adapter_hub(hub_id)
    parts = hub_id.split("/")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        if file is None:
            files = _repo_weight_files(repo)
            file = next((n for n in WEIGHT_NAMES if n in files), files[0] if len(files) == 1 else None)
            if file is None:
                raise AdapterError(f"{hub_id}: name the file, e.g. {repo}/<file>.safetensors (found {files})")
        return Path(hf_hub_download(repo, file))
    except AdapterError:
        raise
    except Exception as e:  # offline, missing repo, auth: say which adapter
        if constants.HF_HUB_OFFLINE:
            raise AdapterError(
                f"{hub_id}: not in the hub cache, and HF_HUB_OFFLINE is set; unset it to download the adapter, or give "
                "the path of a local .safetensors file"
            ) from e
        raise AdapterError(f"{hub_id}: could not fetch the adapter from the hub: {e}") from e


# ------------------------------------------------------------------------------------------ reading


def read_adapter(source: str | Path, transformer=None, next_step: str = "") -> AdapterWeights:
    """Read any supported layout as diffusers' layout. With `transformer`, kohya names are unflattened against it
    and every module is checked to exist with matching shapes. Raises AdapterError naming what does not fit (and
    `next_step` if it does not fit the transformer)."""

    file = resolve_file(source)
    check_adapter_file(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            file_meta = f.metadata() or {}
        metadata = json.loads(file_meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in file_meta else None
    except (SafetensorError, ValueError) as e:  # truncated, not safetensors, or a damaged metadata header
        raise AdapterError(f"{file}: not a readable adapter file ({e}); download or export it again") from e
    if metadata is not None and not isinstance(metadata, dict):
        raise AdapterError(f"{file}: its lora_adapter_metadata is not a JSON object; download or export it again")
    module_names = {name for name, _ in transformer.named_modules()} if transformer is not None else None
    state_dict, layout = convert(raw, module_names, str(file))
    # peft's config beside its weights; a ComfyUI, ai-toolkit or kohya file carries its alphas (folded on reading), so
    # the config of a peft adapter it was exported beside scaled it twice (4x for rsLoRA r=4, alpha=8).
    if metadata is None and layout in ("peft", "diffusers") and (file.parent / "adapter_config.json").is_file():
        metadata = _peft_config_metadata(file.parent / "adapter_config.json")
    check_config(state_dict, {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}, str(file))
    if transformer is not None:
        check_shapes(state_dict, transformer, str(file), next_step)
    if metadata is not None and "transformer.target_modules" not in metadata:
        # peft guesses missing targets from the model type, which a diffusers transformer lacks: a KeyError traceback
        adapted = {k[len("transformer.") : -len(".lora_A.weight")] for k in state_dict if k.endswith(".lora_A.weight")}
        metadata = {**metadata, "transformer.target_modules": sorted(adapted)}
    return AdapterWeights(state_dict, metadata, str(file), layout)


def convert(raw: dict[str, torch.Tensor], module_names: set[str] | None, where: str = "adapter"):
    """Any supported layout -> (`transformer.<module>.lora_A.weight` state dict, layout name)."""
    if not raw:
        raise AdapterError(f"{where}: the file holds no tensors")
    # Integer weights, or a diverged run's NaNs, would otherwise render fully transparent black images without a word.
    bad = next((k for k, v in raw.items() if v.dtype not in _WEIGHT_DTYPES and not _integer_alpha(k, v)), None)
    if bad is not None:
        raise AdapterError(
            f"{where}: {bad!r} holds {str(raw[bad].dtype).removeprefix('torch.')} values; LoRA weights are floating "
            "point (float32, float16 or bfloat16): export the adapter again from its training run"
        )
    bad = next((k for k, v in raw.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise AdapterError(
            f"{where}: {bad!r} holds NaN or infinite values; use a checkpoint from before the run diverged"
        )
    # A negative alpha sent diffusers' alpha folding into an endless loop; a scale beyond any training's is noise.
    bad = next((k for k, v in raw.items() if k.endswith(".alpha") and not _plausible_alpha(v)), None)
    if bad is not None:
        raise AdapterError(
            f"{where}: {bad!r} is {raw[bad].tolist()}; an alpha is one number above 0 and at most {MAX_ALPHA:g}"
        )
    for marker, kind in _UNSUPPORTED.items():
        bad = next((k for k in raw if marker.search(k)), None)
        if bad is not None:
            raise AdapterError(
                f"{where}: {kind} weights ({bad!r}) are not supported; only LoRA (lora_A/B, lora_down/up)"
            )
    if any("dora_scale" in k for k in raw):
        raise AdapterError(
            f"{where}: kohya/ComfyUI-style DoRA (dora_scale) normalises by another norm than peft's DoRA and cannot be "
            "loaded exactly; use an adapter saved by diffusers/peft (lora_magnitude_vector)"
        )
    if any(k.startswith("lora_unet_") for k in raw):
        layout, relative = "kohya", _unflatten_kohya(raw, module_names, where)
    else:
        layout, relative = "diffusers", {}
        for key, value in raw.items():
            prefix = next((p for p in _PREFIXES if key.startswith(p)), "")
            if prefix in ("diffusion_model.", "model.diffusion_model."):
                layout = "comfyui" if any(".lora_down." in k for k in raw) else "ai-toolkit"
            elif prefix == "base_model.model.":
                layout = "peft"
            relative[key[len(prefix) :]] = value
    if all(k.endswith(_DIFFUSERS_PARTS) for k in relative):
        # Already diffusers' layout (ours, peft, DoRA's magnitudes included): nothing to rename or fold.
        converted = {f"transformer.{k}": v for k, v in relative.items()}
    else:
        converted = _fold_with_diffusers(relative, where)
    if not any(k.endswith(".lora_A.weight") for k in converted):
        raise AdapterError(f"{where}: no LoRA weights found (keys look like {sorted(raw)[:3]})")
    return split_fused_mlp(converted), layout


def _plausible_alpha(value: torch.Tensor) -> bool:
    return value.numel() == 1 and 0 < float(value) <= MAX_ALPHA


def _integer_alpha(key: str, value: torch.Tensor) -> bool:
    """An `.alpha` is a scalar: kohya and ComfyUI files may store it as an integer (not a bool)."""
    return (
        key.endswith(".alpha")
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )


def _fold_with_diffusers(relative: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """diffusers' converter: lora_down/up -> lora_A/B, alpha / rank folded into the weights, `transformer.` prefix."""
    try:
        return qmodel.pipeline_class().lora_state_dict({f"diffusion_model.{k}": v for k, v in relative.items()})
    except (ValueError, KeyError) as e:  # KeyError: a lora_down without its lora_up (or the reverse)
        raise AdapterError(f"{where}: not a LoRA state dict diffusers can read ({e})") from e


def _unflatten_kohya(raw, module_names: set[str] | None, where: str) -> dict[str, torch.Tensor]:
    """`lora_unet_transformer_blocks_0_img_mlp_gate_layer.lora_down.weight` -> `transformer_blocks.0.img_mlp.gate_layer...`
    by matching against the transformer's real module names (unambiguous: no two names flatten alike)."""
    if module_names is None:
        raise AdapterError(f"{where}: a kohya-style (lora_unet_) adapter needs the model to unflatten its module names")
    table = {name.replace(".", "_"): name for name in module_names | fused_names(module_names) if name}
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


def _peft_config_metadata(path: Path) -> dict:
    """peft's adapter_config.json -> the transformer.-prefixed LoraConfig kwargs diffusers' loader takes."""

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: not readable JSON ({e}); save the adapter again from its training run") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a peft adapter config (a JSON object); save the adapter again")
    known = {f.name for f in dataclasses.fields(LoraConfig)} - {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
    }
    return {f"transformer.{k}": v for k, v in config.items() if k in known}


def module_scale(config: dict, module: str, rank: int) -> float:
    """The factor peft multiplies `module`'s B @ A by: alpha / rank, or alpha / sqrt(rank) under rsLoRA; 1 for a
    file without a config (diffusers folded alpha / rank into its weights)."""
    if not config:
        return 1.0
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


# ------------------------------------------------------------------------------------------ writing


def write_diffusers(directory: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """`pytorch_lora_weights.safetensors` (keys `transformer.`-prefixed, peft config in the header) that
    `QwenImage21Pipeline.load_lora_weights(directory)` loads unchanged."""
    qmodel.pipeline_class().save_lora_weights(
        str(directory),
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=config,
        weight_name=WEIGHTS_NAME,
        safe_serialization=True,
    )
    return canonical_header(Path(directory) / WEIGHTS_NAME)


def canonical_header(path: Path) -> Path:
    """Put a safetensors file's metadata in key order, in place. safetensors 0.8 writes it in a random order (a Rust
    HashMap), so the same weights saved twice differed in their bytes half the time: the run's last checkpoint was
    not taken for its final adapter, and a re-export had "changed since the image was made"."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return path
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same entries in another order: the same length (the rest is padding)
            f.seek(8)
            f.write(text.ljust(size))
    return path


def to_comfyui(weights: AdapterWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) in ComfyUI's layout: `diffusion_model.<module>.lora_down/lora_up/alpha`, each module's scale
    kept (alpha = scale * rank), MLP halves fused as ComfyUI's Qwen-Image-2.1 model stores them."""
    config = weights.config
    if config.get("use_dora") or any(k.endswith(".lora_magnitude_vector") for k in weights.state_dict):
        raise AdapterError(DORA_TO_COMFYUI)
    state = weights.state_dict
    modules = {}
    for key in sorted(state):
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            down, up = state[key], state[key.replace(".lora_A.", ".lora_B.")]
            modules[module] = (down, up, module_scale(config, module, down.shape[0]))
    out = {}
    for module, (down, up, scale) in fuse_mlp(modules).items():
        _put_comfyui(out, module, down, up, scale)
    rank = config.get("r") or next(v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight"))
    # kohya's header names the default module's rank and alpha; alpha / rank is every module's scale.
    header = {
        "format": "pt",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(module_scale(config, "", rank) * rank),
        EXPORT_MARK: "comfyui",
    }
    return out, header


def provenance(file: Path) -> dict[str, str]:
    """Where an export came from, in its header: the source file's sha256 (as images made with it record it) and, for
    a run's adapter, its base model (a hub id, or a local folder by its last name) and trigger word."""
    found = {"qwen_image_lora_source_sha256": content_hash(file)}
    trained = trained_config(file)
    if trained is not None:
        config = trained[0]
        base = str((config.get("model") or {}).get("pretrained") or "")
        trigger = (config.get("data") or {}).get("trigger_word")
        found |= {"qwen_image_lora_base_model": base if is_hub_id(base) else Path(base).name} if base else {}
        found |= {"qwen_image_lora_trigger_word": str(trigger)} if trigger else {}
    return found


def _trained_base(file: Path) -> str | None:
    """The base model a run's adapter was trained on, when its config.json is at hand (a folder that still exists,
    or a cached hub id); otherwise None, and the released model's architecture is the one checked."""
    trained = trained_config(file)
    base = str(((trained[0].get("model") or {}).get("pretrained") or "")) if trained else ""
    return base if transformer_config_json(base) is not None else None


def _put_comfyui(out: dict, module: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    out[f"diffusion_model.{module}.lora_down.weight"] = down.contiguous()
    out[f"diffusion_model.{module}.lora_up.weight"] = up.contiguous()
    out[f"diffusion_model.{module}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)


def write_comfyui(source: str | Path, output: str | Path | None = None, model: str | None = None) -> Path:
    """Read `source` (any layout with its config, or a folded one) and write it for ComfyUI; default output:
    `comfyui_lora.safetensors` beside the source. Its modules are checked (and a kohya-style file's names unflattened)
    against `model`'s module tree, built from its config.json (default: the base model of the run that trained it,
    else the released model's). Returns the file written."""
    file = resolve_file(source)
    # Every module is checked against the model: a Flux LoRA in diffusers' layout exported as "ComfyUI" unchecked.
    against = model or _trained_base(file) or DEFAULT_MODEL
    weights = read_adapter(file, qmodel.meta_transformer(against), f" (checked against {against}; --model names the "
                           "base model it was trained on, its config.json only)")  # fmt: skip
    tensors, header = to_comfyui(weights)
    header |= provenance(file)
    target = _export_target(Path(weights.source), output)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        canonical_header(tmp)
    return target


def _export_target(source: Path, output: str | Path | None) -> Path:
    """Where the export goes: `output` (a folder: the default name in it), or beside the source, named after it unless
    it is the run's own adapter. It never replaces the adapter it reads, the run's adapter or a file that is not an
    export (each was overwritten; two files exported from one folder both went to comfyui_lora.safetensors)."""
    default = COMFYUI_NAME if source.name == WEIGHTS_NAME else f"{source.stem}_comfyui.safetensors"
    target = Path(output) if output else source.parent / default
    # A folder, existing or not: `exports/` (or `exports`) was written as a file of that name, with no extension.
    if target.is_dir() or str(output).endswith(("/", "\\")) or not target.suffix:
        target = target / default
    elif target.suffix.lower() != ".safetensors":
        raise AdapterError(f"export --output: {target} is not a .safetensors file, which ComfyUI loads; name it "
                           f"{target.with_suffix('.safetensors').name}, or give a folder", "--output")  # fmt: skip
    if target.resolve() == source.resolve() or target.name == WEIGHTS_NAME:
        raise AdapterError(f"export --output: {target} is the adapter's own file; choose another name", "--output")
    if target.exists() and not _is_comfyui_export(target):
        raise AdapterError(f"export --output: {target} exists and is not a ComfyUI export; choose another name or "
                           "remove it (nothing was written)", "--output")  # fmt: skip
    return target


def _is_comfyui_export(path: Path) -> bool:
    """One of our exports: its header's mark (`ss_network_dim` is in every kohya, musubi or sd-scripts file, and a
    user's own LoRA was replaced by it)."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get(EXPORT_MARK) == "comfyui"
    except (OSError, SafetensorError):
        return False


def export_adapter(
    source: str | Path, fmt: str = "comfyui", output: str | Path | None = None, model: str | None = None
) -> Path:
    """`qwen-lora export`: write `source`'s adapter in another layout; returns the file written."""
    if fmt != "comfyui":
        raise AdapterError(f"export --format: unknown {fmt!r}; supported: comfyui")
    return write_comfyui(source, output, model)
