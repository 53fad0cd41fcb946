"""Fit a training step into a GPU: what `qwen-lora plan --gpu-memory` recommends and what the `auto` settings apply at
launch (`train.gradient_checkpointing: auto`, `train.offload_blocks: auto`, for `train.memory_budget_gb`).

The knobs, in the order they are reached for (cheapest first, in step time and in what they change about the run):

1. gradient checkpointing, the fewest blocks (each recomputed block costs its forward again);
2. offloaded blocks: every block checkpointed, the fewest first blocks streamed from CPU memory (costs host-link
   transfers, partly hidden behind compute; `offload.py`);
3. an 8-bit optimizer (`optim.name: adamw8bit`, bitsandbytes' AdamW with 8-bit state: slightly different maths);
4. a quantized base (`model.quantize`: int8, then nf4): the adapter trains against rounded frozen weights.

Each rung keeps the ones before it and tries the cheapest checkpointing, then the fewest offloaded blocks, again.
Plans come from `memory.plan_memory`; the optimizer and offload are applied to a traced plan without tracing
again (`memory.with_settings`), so a ladder costs a few traces per quantization format.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import ConfigError
from qwen_image_lora.data.sources import format_caption
from qwen_image_lora.quantization import check_quantize
from qwen_image_lora.train import memory, offload, ranks
from qwen_image_lora.train.block_checkpointing import apply_block_checkpointing
from qwen_image_lora.train.early import check_offload_blocks
from qwen_image_lora.train.memory import GiB, MemoryPlan, PlanInputs, plan_memory

logger = logging.getLogger("qwen_image_lora.train")

KNOBS = ("checkpoint", "offload", "optimizer", "quantize")
# What the ladder reaches for, in order, beyond the config's own optimizer and quantization.
_8BIT_OPTIMIZER = "adamw8bit"
_QUANTIZE_ORDER = ("none", "int8", "nf4")
# The host link the transfer estimate assumes: PCIe 4.0 x16 moves ~25 GB/s of its 32 GB/s in practice.
HOST_LINK_BYTES_PER_S = 25e9
# Blocks an FSDP2 process holds whole at once: the one computing and the one prefetched (`sharded`).
GATHERED_BLOCKS = 2


@dataclass
class Recipe:
    """A resolved memory setting: `plan.inputs` carries checkpointing, offload, optimizer and quantization."""

    plan: MemoryPlan
    gpu_bytes: int

    @property
    def inputs(self) -> PlanInputs:
        return self.plan.inputs

    @property
    def fits(self) -> bool:
        return self.plan.fits(self.gpu_bytes)

    @property
    def host_seconds_per_step(self) -> float:
        """Host-to-GPU transfer time per step at `HOST_LINK_BYTES_PER_S`, if none of it overlapped compute."""
        return self.plan.host_bytes_per_step / HOST_LINK_BYTES_PER_S

    def overrides(self) -> list[str]:
        """The config settings that select this recipe at launch."""
        n, ck = self.inputs.num_layers, self.plan.checkpointed
        gc = "true" if len(ck) >= n else "false" if not ck else "auto"
        out = [f"train.gradient_checkpointing={gc}"]
        if gc == "auto":  # the launch picks the same blocks for the same budget
            out.append(f"train.memory_budget_gb={self.gpu_bytes / GiB:g}")
        return out + [
            f"train.offload_blocks={self.plan.offloaded}",
            f"optim.name={self.inputs.optimizer}",
            f"model.quantize={self.inputs.quantize}",
        ]

    def describe(self) -> str:
        n, ck, k = self.inputs.num_layers, len(self.plan.checkpointed), self.plan.offloaded
        parts = [
            "every block checkpointed"
            if ck >= n
            else "no checkpointing"
            if not ck
            else f"{ck} of {n} blocks checkpointed"
        ]
        if k:
            parts.append(f"the first {k} of {n} blocks offloaded to CPU memory")
        if self.plan.shards > 1:
            parts.append(f"sharded across {self.plan.shards} processes (FSDP2)")
        parts.append(f"optimizer {self.inputs.optimizer}")
        parts.append("base " + ("unquantized" if self.inputs.quantize == "none" else f"{self.inputs.quantize}"))
        return ", ".join(parts)

    def transfer_line(self) -> str:
        if not self.plan.offloaded:
            return "host link: nothing streamed per step"
        gb = self.plan.host_bytes_per_step / 1e9
        return (
            f"host link: {gb:.1f} GB copied to the GPU per step, about +{self.host_seconds_per_step:.2f} s/step at "
            f"{HOST_LINK_BYTES_PER_S / 1e9:.0f} GB/s (PCIe 4.0 x16) where compute does not hide it (an estimate, "
            "not measured)"
        )


def fit(inputs: PlanInputs, gpu_bytes: int, free=KNOBS, planner: Callable = plan_memory) -> Recipe:
    """The cheapest recipe whose plan fits a GPU of `gpu_bytes`, moving only the `free` knobs (`KNOBS`); the others
    keep `inputs`' values. When nothing fits, the most frugal recipe tried (the smallest peak: not the last rung,
    as nf4 weights stay put while int8 ones can all be offloaded), whose `fits` is False."""
    budget = memory.budget_for_allocations(gpu_bytes)
    if inputs.shards > 1:  # under FSDP2 neither a quantized base nor 8-bit state shards (`preflight.check_shardable`)
        if "quantize" in free:
            inputs = dataclasses.replace(inputs, quantize="none")
        if "optimizer" in free and inputs.optimizer == "adamw8bit":
            inputs = dataclasses.replace(inputs, optimizer="adamw")
    traced = _TraceCache(planner)
    tried = []
    for quantize, optimizer in _rungs(inputs, free):
        rung = dataclasses.replace(inputs, quantize=quantize, optimizer=optimizer, offload_blocks=0)
        plan = _fit_rung(rung, budget, free, traced, inputs.offload_blocks)
        tried.append(Recipe(plan, gpu_bytes))
        if tried[-1].fits:
            return tried[-1]
    return min(tried, key=lambda recipe: recipe.plan.peak)


def _rungs(inputs: PlanInputs, free) -> list[tuple[str, str]]:
    rungs = [(inputs.quantize, inputs.optimizer)]
    if inputs.shards > 1:  # neither shards under FSDP2 (`preflight.check_shardable`)
        return rungs
    if "optimizer" in free and inputs.optimizer == "adamw":
        rungs.append((inputs.quantize, _8BIT_OPTIMIZER))
    if "quantize" in free and inputs.quantize in _QUANTIZE_ORDER:
        for q in _QUANTIZE_ORDER[_QUANTIZE_ORDER.index(inputs.quantize) + 1 :]:
            rungs.append((q, rungs[-1][1]))
    return rungs


def _fit_rung(rung: PlanInputs, budget: int, free, traced: _TraceCache, offload_given: int) -> MemoryPlan:
    """Within one (quantization, optimizer): the fewest checkpointed blocks with nothing offloaded, else every block
    checkpointed and the fewest offloaded. Returns the cheapest plan under `budget`, else the most frugal one."""
    n = rung.num_layers
    # bitsandbytes' 4-bit weights do not move; under FSDP2 the shards are the saving
    can_offload = "offload" in free and rung.quantize != "nf4" and rung.shards == 1
    can_checkpoint_all = "checkpoint" in free or rung.checkpoint == "all"
    if "offload" not in free and offload_given:  # a fixed number of offloaded blocks: all checkpointed
        return memory.with_settings(traced(dataclasses.replace(rung, checkpoint="all")), offload_blocks=offload_given)
    if "checkpoint" in free:
        try:
            blocks = choose_checkpointed_blocks(rung, budget, traced)
            return traced(dataclasses.replace(rung, checkpoint=blocks))
        except MemoryError:
            pass
    else:
        plan = traced(rung)
        if plan.peak <= budget or not (can_offload and can_checkpoint_all):
            return plan
    if not can_checkpoint_all:
        return traced(rung)
    every = traced(dataclasses.replace(rung, checkpoint="all"))
    if not can_offload:
        return every
    for k in range(n + 1):  # counted, not traced: each k costs nothing
        plan = memory.with_settings(every, offload_blocks=k)
        if plan.peak <= budget:
            return plan
    return plan


def sharded(plan: MemoryPlan, shards: int) -> MemoryPlan:
    """One process's share of a traced (unsharded) step under FSDP2 across `shards` processes, counted, not traced:
    each holds 1/shards of every block's weights, of the LoRA and of its optimizer state, plus the blocks gathered
    whole around their use (`GATHERED_BLOCKS`: the one computing and the one prefetched, in forward and in the
    recompute of backward). The weights outside the blocks (embeddings, final norm and projection) are counted
    whole: the root module gathers them for the whole step. Gradients are counted whole (conservative)."""
    if shards <= 1 or plan.shards > 1:
        return plan
    blocks = plan.inputs.num_layers * plan.block_weights
    frozen = plan.frozen_weights - blocks + math.ceil(blocks / shards) + GATHERED_BLOCKS * plan.block_weights
    frozen = min(frozen, plan.frozen_weights)
    lora, state = math.ceil(plan.lora_params / shards), math.ceil(plan.optimizer_state / shards)
    new = dataclasses.replace(
        plan, inputs=dataclasses.replace(plan.inputs, shards=shards), shards=shards, frozen_weights=frozen,
        lora_params=lora, optimizer_state=state,
    )  # fmt: skip
    new.peak = plan.peak - (plan.frozen_weights - frozen) - (plan.lora_params - lora) - (plan.optimizer_state - state)
    return new


class _TraceCache:
    """`planner` once per (layers, checkpointed blocks, quantization); the optimizer and offload of the inputs are
    applied to the cached trace (`memory.with_settings`)."""

    def __init__(self, planner: Callable):
        self.planner, self.plans = planner, {}

    def __call__(self, inputs: PlanInputs) -> MemoryPlan:
        ck = inputs.checkpoint
        key = (inputs.num_layers, ck if isinstance(ck, str) else tuple(ck), inputs.quantize)
        if key not in self.plans:
            self.plans[key] = self.planner(dataclasses.replace(inputs, optimizer="adamw", offload_blocks=0, shards=1))
        plan = memory.with_settings(self.plans[key], optimizer=inputs.optimizer, offload_blocks=inputs.offload_blocks)
        return sharded(plan, inputs.shards)


# --------------------------------------------------------------------------------------------------------------
# gradient_checkpointing: auto


def choose_checkpointed_blocks(inputs: PlanInputs, budget_bytes: int, planner: Callable = plan_memory) -> list[int]:
    """The fewest transformer blocks to checkpoint so the planned peak allocation stays under `budget_bytes`.

    The last block is never checkpointed: its activations are consumed first in backward, so recomputing them
    saves nothing at the peak. Blocks are identical, so the peak is (piecewise) affine in the number of blocks
    n and of checkpointed blocks k: three traces of a 3- and a 4-block model of the same width fit
    peak = a + b*n + c*k, which gives a first k; full traces then check it, stepping k by the fitted slope
    until the plan is under budget (usually one full trace). Raises `MemoryError` when even n-1 is over.
    """
    n = inputs.num_layers
    most = max(n - 1, 0)

    @functools.cache
    def trace(k: int, layers: int = n) -> int:
        config = {**inputs.transformer_config, "num_layers": layers}
        return planner(dataclasses.replace(inputs, transformer_config=config, checkpoint=list(range(k)))).peak

    if n > 5:
        per_layer = trace(0, 4) - trace(0, 3)
        per_block = max(1.0, (trace(0, 4) - trace(2, 4)) / 2)
        estimate0 = trace(0, 3) + (n - 3) * per_layer
        k = min(most, max(0, math.ceil((estimate0 - budget_bytes) / per_block)))
    else:
        per_block, k = None, 0
    while trace(k) > budget_bytes:
        if k >= most:
            raise MemoryError(
                f"even with {most} of {n} blocks checkpointed the planned peak is {trace(most) / GiB:.1f} GiB, "
                f"over the {budget_bytes / GiB:.1f} GiB budget: lower data.resolution, train.batch_size or "
                "the LoRA rank"
            )
        step = 1 if per_block is None else max(1, math.ceil((trace(k) - budget_bytes) / per_block))
        k = min(most, k + step)
    while k > 0 and (per_block is None or trace(k) + per_block <= budget_bytes) and trace(k - 1) <= budget_bytes:
        k -= 1
    return list(range(k))


def blocks_for_gpu(inputs: PlanInputs, gpu_bytes: int, planner: Callable = plan_memory) -> list[int]:
    """`choose_checkpointed_blocks` for a GPU of `gpu_bytes` (its allocation budget after context and margin)."""
    return choose_checkpointed_blocks(inputs, memory.budget_for_allocations(gpu_bytes), planner)


# --------------------------------------------------------------------------------------------------------------
# At launch


def resolve(
    cfg,
    references: int,
    *,
    gpu_bytes: int | None = None,
    prompt_tokens: int = 256,
    bucket: tuple[int, int] | None = None,
    plan_fixed: bool = False,
    shards: int = 1,
    processes: int = 1,
    planner: Callable = plan_memory,
) -> Recipe | None:
    """The config's memory settings, each `auto` one chosen by `fit` for `gpu_bytes` (default
    `train.memory_budget_gb`) at the config's largest step (`references` condition images), for one of `shards`
    FSDP2 processes. When nothing is `auto`: the plan of the settings as they are with `plan_fixed`, else None (the
    launch then plans nothing). Offloading trains on one process, so `auto` never offloads for `processes` > 1."""
    gc, k = cfg.train.gradient_checkpointing, cfg.train.offload_blocks
    free = ({"checkpoint"} if gc == "auto" else set()) | ({"offload"} if k == "auto" and processes == 1 else set())
    if not free and not plan_fixed and k != "auto":  # `auto` under DDP still resolves (to no offloading)
        return None
    checkpoint = "none" if gc is False else "all"
    inputs = memory.plan_inputs_from_config(
        cfg, references=references, prompt_tokens=prompt_tokens, checkpoint=checkpoint, bucket=bucket
    )
    inputs.offload_blocks = 0 if k == "auto" else k
    inputs.shards = shards
    gpu = budget_bytes(cfg) if gpu_bytes is None else gpu_bytes
    return fit(inputs, gpu, free=free, planner=planner)


def budget_bytes(cfg) -> int:
    """`train.memory_budget_gb` in bytes; `auto` is the total memory of the run's GPU (the current device). Raises
    ConfigError where there is none."""
    gb = cfg.train.memory_budget_gb
    if gb != "auto":
        return int(gb * GiB)
    if not torch.cuda.is_available():
        raise ConfigError("train.memory_budget_gb: auto reads the GPU's size, and there is no GPU here; give the size "
                          "to plan for in GB, e.g. train.memory_budget_gb=24")  # fmt: skip
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def largest_step(cfg, entries, tokenizer) -> tuple[int, tuple[int, int]]:
    """(prompt tokens, (height, width)) that `auto` plans the launch for: the data's longest caption in tokens (at
    least `qwen-lora plan`'s 256: 1024-token captions planned as 256 ran 1 GiB over a 24 GB budget) and the larger of
    its biggest bucket and the one `plan` assumes (`memory.largest_bucket`)."""
    texts = {format_caption(caption, cfg.data) for entry in entries for caption in entry.item.captions}
    tokens = max([256, *(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)])
    sizes = [entry.target.bucket for entry in entries] + [s.bucket for entry in entries for s in entry.sources]
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    planned = memory.largest_bucket(cfg.data.resolution, cfg.data.max_aspect)
    return tokens, (height, width) if width * height > planned[0] * planned[1] else planned


def apply(transformer, cfg, device, references: int, num_processes: int = 1, step=None) -> Recipe | None:
    """Checkpoint and place the transformer as the config says, `auto` settings resolved by `resolve` for `step`
    (the data's (prompt tokens, (height, width)) at its largest, or None: `qwen-lora plan`'s defaults): what the
    recipe calls after adding LoRA. Offloaded blocks keep their frozen weights in CPU memory (`offload.py`); the
    rest goes to `device`."""
    check_quantize(cfg.model.quantize, torch.device(device).type)  # nf4 loads onto CUDA whatever accelerate chose
    fsdp = ranks.fsdp_launch()
    tokens, bucket = step or (256, None)
    recipe = resolve(cfg, references, prompt_tokens=tokens, bucket=bucket, shards=num_processes if fsdp else 1,
                     processes=num_processes)  # fmt: skip
    if recipe is not None and not recipe.fits:
        budget = recipe.gpu_bytes / GiB
        config = "" if cfg.source in (None, "<defaults>") else f" --config {shlex.quote(cfg.source)}"
        given = [o for o in cfg.overrides if not o.startswith("train.memory_budget_gb=")]
        plan = f"`qwen-lora plan{config}{''.join(' ' + shlex.quote(o) for o in given)} --gpu-memory {budget:g}GB"
        more = "" if cfg.train.offload_blocks == "auto" else "offloaded blocks, "  # the 16 GB card's answer
        hint = (
            f"{plan} --processes N` plans more FSDP2 processes" if fsdp
            else f"DDP keeps the whole model on each GPU: {plan}` names a one-process recipe that fits (offloaded "
            "blocks, an 8-bit optimizer, a quantized base), or shard it (configs/accelerate/fsdp.yaml)"
            if num_processes > 1 else f"{plan}` also tries {more}an 8-bit optimizer and a quantized base, and names "
            "a recipe if one fits; if none does, lower data.resolution or train.batch_size, or use a larger card"
        )  # fmt: skip
        raise ConfigError(
            f"train.memory_budget_gb: the planned step needs {recipe.plan.total / GiB:.2f} GiB even with "
            f"{recipe.describe()}, over {budget:g} GB; {hint}"
        )
    n = len(qmodel.transformer_blocks(transformer))
    if recipe is not None:
        checkpointed, k = recipe.plan.checkpointed, recipe.plan.offloaded
        everything = len(checkpointed) >= n
    else:
        gc, k = cfg.train.gradient_checkpointing, cfg.train.offload_blocks
        checkpointed, everything = [], gc is True or k > 0
    check_offload_blocks(k, n)
    if k and (num_processes > 1 or ranks.fsdp_launch()):
        raise ConfigError(
            "train.offload_blocks: offloading trains on one process (DDP keeps the whole model on "
            "each GPU); set it to 0 or launch one process"
        )
    if k and cfg.model.compile:
        raise ConfigError(
            "train.offload_blocks: not with model.compile (the streaming hooks sit inside the "
            "compiled blocks); set model.compile: false"
        )
    if recipe is None and (k or cfg.model.quantize != "none"):  # `auto` says its recipe; FSDP says its sharding
        said = [f"the first {k} of {n} blocks stream from CPU memory"] if k else []
        said += [f"the frozen base is {cfg.model.quantize}"] if cfg.model.quantize != "none" else []
        logger.info("memory: %s", "; ".join(said))
    if everything:
        transformer.enable_gradient_checkpointing()
    elif checkpointed:
        apply_block_checkpointing(transformer, checkpointed)
    if not ranks.fsdp_launch():  # under FSDP, `ranks.prepare` places each rank's shards
        offload.place_transformer(transformer, device, range(k))
    return recipe
