"""Random LoRA adapters for tests and benchmarks (no training needed), saved exactly as `save_lora_weights` saves
a trained one, plus the same weights re-keyed in the ComfyUI and kohya layouts."""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


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
    from diffusers import QwenImage21Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

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
        metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(set(targets)) if isinstance(targets, list) else targets}
        QwenImage21Pipeline.save_lora_weights(
            directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
        )
    finally:
        transformer.delete_adapters(name)
    return Path(directory)


def to_comfyui(diffusers_file: str | Path, out_file: str | Path, alpha: float | None = None) -> Path:
    """Re-key a diffusers adapter as ComfyUI does: `diffusion_model.<module>`, lora_down/lora_up, optional alpha."""
    return _rekey(diffusers_file, out_file, alpha, lambda module: f"diffusion_model.{module}")


def to_kohya(diffusers_file: str | Path, out_file: str | Path, alpha: float | None = None) -> Path:
    """Re-key a diffusers adapter as kohya/musubi-tuner do: `lora_unet_<module_with_underscores>`."""
    return _rekey(diffusers_file, out_file, alpha, lambda module: "lora_unet_" + module.replace(".", "_"))


def _rekey(diffusers_file, out_file, alpha: float | None, rename) -> Path:
    from safetensors.torch import load_file, save_file

    out = {}
    for key, value in load_file(str(diffusers_file)).items():
        module = rename(key.removeprefix("transformer.").rsplit(".lora_", 1)[0])
        part = "lora_down.weight" if ".lora_A." in key else "lora_up.weight"
        out[f"{module}.{part}"] = value
        if alpha is not None and part == "lora_down.weight":
            out[f"{module}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(out_file))
    return Path(out_file)
