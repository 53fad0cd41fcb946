"""Random LoRA adapters for tests and benchmarks (no training needed), saved exactly as training saves one, plus
the same adapter in the layouts other tools write (ComfyUI, kohya/musubi, ai-toolkit)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from qwen_image_lora.adapter_format import read_adapter, to_comfyui, write_diffusers
from qwen_image_lora.presets import LORA_TARGETS

ATTENTION = LORA_TARGETS["attention"]


def make_random_lora(
    transformer,
    directory: str | Path,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    std: float = 0.5,
    targets: list[str] | str = ATTENTION,
) -> Path:
    """Add a peft LoRA to `transformer`, randomise lora_B (std `std`), save it in our/diffusers layout into
    `directory`, then remove it again so the transformer is left as it was. Returns the folder."""

    name = "_random_lora"
    alpha = float(rank if alpha is None else alpha)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    transformer.add_adapter(config, adapter_name=name)
    try:
        g = torch.Generator().manual_seed(seed)
        for module_name, module in transformer.named_modules():
            if hasattr(module, "lora_B") and name in module.lora_B:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                with torch.no_grad():
                    a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                    b.copy_(torch.randn(b.shape, generator=g) * std)
        state = get_peft_model_state_dict(transformer, adapter_name=name)
        metadata = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(set(targets)) if isinstance(targets, list) else targets,
        }
        write_diffusers(directory, state, metadata)
    finally:
        transformer.delete_adapters(name)
    return Path(directory)


def in_layout(source: str | Path, out_file: str | Path, layout: str) -> Path:
    """`source`'s adapter as another tool writes it: "comfyui" (our export), "kohya" (those keys flattened to
    `lora_unet_<module_with_underscores>`, as kohya/musubi-tuner name them) or "ai-toolkit" (ComfyUI's prefix with
    peft's lora_A/lora_B names)."""

    tensors, header = to_comfyui(read_adapter(source))
    rename = {"comfyui": lambda key: key, "kohya": _kohya_key, "ai-toolkit": _ai_toolkit_key}[layout]
    save_file({rename(k): v for k, v in tensors.items()}, str(out_file), metadata=header)
    return Path(out_file)


def _kohya_key(key: str) -> str:
    name = key.removeprefix("diffusion_model.")
    part = next(p for p in (".lora_down.weight", ".lora_up.weight", ".alpha") if name.endswith(p))
    return "lora_unet_" + name.removesuffix(part).replace(".", "_") + part


def _ai_toolkit_key(key: str) -> str:
    return key.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
