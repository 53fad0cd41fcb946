"""Block offload (`train.offload_blocks`): the frozen weights of the first k transformer blocks live in pinned CPU
memory and are streamed to the GPU one block ahead of use, in the forward and in the recomputed forward of
backward. The LoRA weights of those blocks stay on the GPU, where the optimizer steps them.

diffusers' group offloading does the transfers: `ModuleGroup` keeps the pinned copies, copies on a side CUDA stream,
swaps torchao tensors and records streams so freed memory is not reused early. What it lacks for training is written
here, and only that:

- its groups move every parameter of a module, LoRA included, and with streams they restore the pinned copy taken
  when offloading began, which would undo every optimizer step; here a group holds the block's frozen tensors only;
- it prefetches in forward order, but backward recomputes the blocks in reverse; here the prefetch follows the
  phase (the transformer's forward hooks flip it), and in backward a block is released only once the next one
  down starts recomputing, since its own backward still reads the weights its recompute used;
- its hooks sit on the block, whose `forward` the per-block checkpointing (`block_checkpointing`) replaces and
  recomputes by calling the class's forward directly; here they sit on the block's children (attention, MLP),
  which run inside that forward, so they fire in the recompute too.

Offloaded blocks must be checkpointed: a block that kept its activations would keep references to weights that
have gone back to the CPU. The hooks are registered under diffusers' group-offloading name, so diffusers treats the
transformer as group offloaded: its `.device` is the GPU and `.to()` leaves the placement alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.group_offloading import (  # diffusers' own machinery, reused as is
    _GROUP_OFFLOADING,
    GroupOffloadingConfig,
    GroupOffloadingHook,
    ModuleGroup,
    _is_group_offload_enabled,
)

from qwen_image_lora import model as qmodel

# Resident offloaded blocks at most, in bytes of one block: the one computing, the one prefetched, and the one just
# released, whose GPU memory returns once the compute stream has finished with it (record_stream).
IN_FLIGHT_BLOCKS = 3


class BlockOffloader:
    """Streams the frozen weights of `blocks` between CPU memory and `device` around their use.

    `bytes_moved` counts host-to-device bytes since creation; `onloads` lists the blocks onloaded since the last
    forward began, in order (forward ascending, then the backward recompute descending). Backward ends on the first
    offloaded block and the next forward starts with it, so it stays; the last one stays from forward into backward:
    2k - 2 block copies per step for k blocks (one more in the first step).
    """

    def __init__(self, transformer, blocks: Sequence[int], device: torch.device):
        self.transformer = transformer
        self.order = sorted(int(i) for i in blocks)
        self.device = torch.device(device)
        self.phase = "forward"
        self.resident: set[int] = set()
        self.in_transit: set[int] = set()  # copies queued on the side stream, not yet waited for
        self.bytes_moved = 0
        self.onloads: list[int] = []
        use_stream = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if use_stream else None
        self.config = GroupOffloadingConfig(
            onload_device=self.device, offload_device=torch.device("cpu"), offload_type="block_level",
            non_blocking=use_stream, record_stream=use_stream, low_cpu_mem_usage=False, num_blocks_per_group=1,
            stream=self.stream,
        )  # fmt: skip
        self.groups: dict[int, ModuleGroup] = {}
        self.block_bytes: dict[int, int] = {}
        blocks_list = qmodel.transformer_blocks(transformer)
        for i in self.order:
            self._hook_block(i, blocks_list[i])
        transformer.register_forward_pre_hook(self._forward_starts)
        transformer.register_forward_hook(self._forward_ends)

    # ---------------------------------------------------------------------------------------------- setup

    def _hook_block(self, index: int, block: torch.nn.Module) -> None:
        if any(True for _ in block.parameters(recurse=False)):
            raise ValueError(f"block {index} holds parameters of its own; only its children's can be offloaded")
        frozen = [p for p in block.parameters() if not p.requires_grad]
        buffers = list(block.buffers())
        children = [c for c in block.children() if any(not p.requires_grad for p in c.parameters())]
        for p in block.parameters():
            if p.requires_grad:  # the LoRA weights stay on the GPU with their gradients and optimizer state
                p.data = p.data.to(self.device)
        # Children in declaration order, which is the order the block runs them; every one checks that its weights
        # are there, so a different order costs a wait, never a wrong device.
        group = ModuleGroup(
            modules=[], offload_device=torch.device("cpu"), onload_device=self.device, offload_leader=children[-1],
            onload_leader=children[0], parameters=frozen, buffers=buffers, non_blocking=self.config.non_blocking,
            stream=self.stream, record_stream=self.config.record_stream, low_cpu_mem_usage=False,
        )  # fmt: skip
        group.offload_()  # to the pinned copies (with a stream), leaving nothing of the block on the GPU
        self.groups[index] = group
        self.block_bytes[index] = sum(_nbytes(t) for t in [*frozen, *buffers])
        for position, child in enumerate(children):
            hook = _ChildHook(self, index, position == 0, position == len(children) - 1, group, self.config)
            HookRegistry.check_if_exists_or_initialize(child).register_hook(hook, _GROUP_OFFLOADING)

    # ---------------------------------------------------------------------------------------------- schedule

    def _forward_starts(self, module, args) -> None:
        self.phase = "forward"
        self.onloads = []
        for i in sorted(self.resident - set(self.order[:1])):  # the last backward ended on the first block: keep it
            self._offload(i)
        if self.order:
            self._onload(self.order[0])  # overlaps the embeddings

    def _forward_ends(self, module, args, output) -> None:
        self.phase = "backward"
        if torch.is_grad_enabled() and self.order:
            self._onload(self.order[-1])  # the first offloaded block backward recomputes

    def before(self, index: int, first: bool) -> None:
        """A child of block `index` is about to run (forward, or backward's recompute)."""
        if self.phase == "backward" and first:
            for j in [j for j in self.resident if j > index]:  # their backward is done
                self._offload(j)
        if index not in self.resident:  # a prefetch that did not happen: load now
            self._onload(index)
        if index in self.in_transit:
            self.stream.synchronize()  # this block's copies have landed (and any queued before them)
            self.in_transit.clear()
        if first:
            step = 1 if self.phase == "forward" else -1
            position = self.order.index(index) + step
            if 0 <= position < len(self.order):
                self._onload(self.order[position])

    def after(self, index: int) -> None:
        """The last child of block `index` has run. In backward the block's own gradients still need its
        weights; in forward it goes back, unless it is the block backward starts with."""
        if self.phase == "forward" and not (torch.is_grad_enabled() and index == self.order[-1]):
            self._offload(index)

    def _onload(self, index: int) -> None:
        if index in self.resident:
            return
        self.groups[index].onload_()  # which first waits for the copies queued before
        self.resident.add(index)
        if self.stream is not None:
            self.in_transit = {index}
        self.bytes_moved += self.block_bytes[index]
        self.onloads.append(index)

    def _offload(self, index: int) -> None:
        if index in self.resident:
            self.groups[index].offload_()
            self.resident.discard(index)


class _ChildHook(GroupOffloadingHook):
    """diffusers' group-offloading hook on one child of an offloaded block, scheduled by `BlockOffloader`."""

    def __init__(self, offloader: BlockOffloader, index: int, first: bool, last: bool, group, config):
        super().__init__(group, config=config)
        self.offloader, self.index, self.first, self.last = offloader, index, first, last

    def initialize_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        self.offloader.before(self.index, self.first)
        return args, kwargs

    def post_forward(self, module, output):
        if self.last:
            self.offloader.after(self.index)
        return output


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor as stored, inner tensors of a torchao weight included."""
    names = getattr(t, "tensor_data_names", None)
    if names:
        return sum(_nbytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def is_offloaded(transformer) -> bool:
    """True when some of `transformer`'s blocks stream from CPU memory (its placement is done)."""
    return _is_group_offload_enabled(transformer)


def place_transformer(transformer, device: torch.device, offload: Sequence[int] = ()) -> BlockOffloader | None:
    """Put the transformer on `device`, except the frozen weights of the `offload` blocks, which stream in and out
    around their use (see the module docstring). The caller has checkpointed those blocks."""
    blocks = qmodel.transformer_blocks(transformer)
    offload = sorted({int(i) for i in offload})
    if not offload:
        transformer.to(device)
        return None
    bad = [i for i in offload if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"train.offload_blocks: block indices {bad} out of range 0..{len(blocks) - 1}")
    for name, child in transformer.named_children():
        if child is not blocks:
            child.to(device)
    for t in [*transformer.parameters(recurse=False), *transformer.buffers(recurse=False)]:
        t.data = t.data.to(device)
    for i, block in enumerate(blocks):
        if i not in offload:
            block.to(device)
    return BlockOffloader(transformer, offload, device)
