"""Checkpoint a chosen subset of the transformer's blocks (diffusers' switch checkpoints all of them); the
memory planner (`memory.py`) picks the subset for `train.gradient_checkpointing: auto`."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from qwen_image_lora import model as qmodel


def apply_block_checkpointing(transformer, block_indices: Sequence[int], preserve_rng_state: bool = True) -> None:
    """Recompute the activations of the given transformer blocks in backward instead of keeping them.

    Works on a subset of blocks (diffusers' `enable_gradient_checkpointing` checkpoints all of them). The block
    modules stay where they are, so parameter names, peft and saved adapters are unchanged: only each chosen
    block's `forward` is replaced by a non-reentrant `torch.utils.checkpoint` call. Calling it again replaces
    the previous choice; leave `transformer.gradient_checkpointing` off.
    """
    chosen = set(int(i) for i in block_indices)
    blocks = qmodel.transformer_blocks(transformer)
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"block indices {sorted(bad)} out of range 0..{len(blocks) - 1}")
    if getattr(transformer, "gradient_checkpointing", False):
        raise ValueError("disable the transformer's own gradient checkpointing before checkpointing single blocks")
    for index, block in enumerate(blocks):
        block.__dict__.pop("forward", None)  # back to the class's forward
        if index in chosen:
            block.forward = _checkpointed_forward(block, preserve_rng_state)


def _checkpointed_forward(block, preserve_rng_state: bool) -> Callable:
    plain = type(block).forward.__get__(block)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return plain(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(
            plain, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs
        )

    forward.checkpointed = True
    return forward


def checkpointed_blocks(transformer) -> list[int]:
    """Indices of the blocks `apply_block_checkpointing` checkpoints."""
    blocks = qmodel.transformer_blocks(transformer)
    return [i for i, b in enumerate(blocks) if getattr(b.__dict__.get("forward"), "checkpointed", False)]
