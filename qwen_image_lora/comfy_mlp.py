"""ComfyUI's fused SwiGLU linear, both ways, exactly.

ComfyUI's Qwen-Image-2.1 model stores each block's `img_mlp.gate_layer` and `img_mlp.proj` as one `img_mlp.gate_up`
linear, gate rows first (`model.COMFYUI_FUSED_LINEARS`); diffusers' model keeps the halves, so unfused names match no
weight in ComfyUI and fused ones no module here. Reading a ComfyUI file splits its fused LoRA into one per half; the
ComfyUI export fuses each block's halves: down = the two A matrices stacked (rank 2r), up = the two B matrices
block-diagonal, whose product is exactly the two deltas stacked in ComfyUI's row order.
"""

from __future__ import annotations

import torch

from qwen_image_lora import model as qmodel

# The one linear ComfyUI's Qwen-Image-2.1 model fuses, and its halves in row order (gate rows first).
((MLP_FUSED, MLP_HALVES),) = qmodel.COMFYUI_FUSED_LINEARS.items()


def fused_names(module_names: set[str]) -> set[str]:
    """The fused linear's name in each block that has the halves (the name a kohya-style ComfyUI file uses)."""
    return {n.replace(MLP_HALVES[0], MLP_FUSED) for n in module_names if n.endswith(MLP_HALVES[0])}


def split_fused_mlp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fused `img_mlp.gate_up` LoRA -> one LoRA per half, exactly: both keep the whole down matrix, each
    takes its rows of up (gate rows first), so each half's delta is its rows of the fused delta."""
    out = {}
    for key, value in state.items():
        if f".{MLP_FUSED}.lora_A." in key:
            for half in MLP_HALVES:
                out[key.replace(MLP_FUSED, half)] = value
        elif f".{MLP_FUSED}.lora_B." in key:
            rows = value.shape[0] // 2
            for i, half in enumerate(MLP_HALVES):
                out[key.replace(MLP_FUSED, half)] = value[i * rows : (i + 1) * rows].contiguous()
        else:
            out[key] = value
    return out


def fuse_mlp(modules: dict[str, tuple]) -> dict[str, tuple]:
    """{module: (down, up, scale)} -> the same with each block's MLP halves fused into ComfyUI's one linear (the
    other modules first, in their order, then the fused ones)."""
    out, fused = {}, {}
    for module, lora in modules.items():
        half = next((h for h in MLP_HALVES if module.endswith("." + h)), None)
        if half is None:
            out[module] = lora
        else:
            fused.setdefault(module.removesuffix(half) + MLP_FUSED, {})[half] = lora
    out.update((module, fuse_mlp_halves(halves)) for module, halves in fused.items())
    return out


def fuse_mlp_halves(
    halves: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """{half: (down [r, in], up [hidden, r], scale)} -> (down [sum r, in], up [2 * hidden, sum r], scale) with
    scale * up @ down == the halves' scaled deltas stacked gate rows first (a missing half contributes zero rows)."""
    scale = next(iter(halves.values()))[2]
    hidden = next(iter(halves.values()))[1].shape[0]
    downs = [halves[h][0] for h in MLP_HALVES if h in halves]
    down = torch.cat(downs)
    up = torch.zeros(2 * hidden, down.shape[0], dtype=down.dtype)
    col = 0
    for i, half in enumerate(MLP_HALVES):
        if half in halves:
            d, u, s = halves[half]
            up[i * hidden : (i + 1) * hidden, col : col + d.shape[0]] = u if s == scale else u * (s / scale)
            col += d.shape[0]
    return down, up, scale
