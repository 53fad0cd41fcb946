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
    """ComfyUI's fused `img_mlp.gate_up` LoRA -> one LoRA per half, exactly: each half takes its rows of up (gate rows
    first) and the down rows its up columns use, so each half's delta is its rows of the fused delta. Our own export
    (up block-diagonal) thus comes back at its rank r, not 2r, and `lora.init_from` takes it."""
    out = {}
    for key, value in state.items():
        if f".{MLP_FUSED}.lora_A.weight" in key:
            continue  # split with its up matrix below
        if f".{MLP_FUSED}.lora_B." not in key:
            out[key] = value
            continue
        rows = value.shape[0] // 2
        down = state.get(key.replace(".lora_B.", ".lora_A.")) if key.endswith(".lora_B.weight") else None
        for i, half in enumerate(MLP_HALVES):
            up = value[i * rows : (i + 1) * rows]
            if down is None:  # a bias: its rows alone
                out[key.replace(MLP_FUSED, half)] = up.contiguous()
                continue
            used = up.ne(0).any(dim=0)  # a column of zeros adds nothing: its down row is dropped with it
            used = used if used.any() else torch.ones_like(used)  # an untrained half keeps the whole rank
            out[key.replace(MLP_FUSED, half)] = up[:, used].contiguous()
            out[key.replace(MLP_FUSED, half).replace(".lora_B.", ".lora_A.")] = down[used].contiguous()
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
