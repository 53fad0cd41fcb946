"""Plan the GPU memory of one training step without a GPU or weights, and checkpoint only the blocks needed.

The planner builds the transformer from its config under torch's `FakeTensorMode` (tensors with shapes and
dtypes but no data), adds the LoRA adapter the way the trainer does, and runs real training steps: forward
under bf16 autocast, backward, gradient clipping and an AdamW step. A `TorchDispatchMode` (`StorageTracker`)
sees every tensor an op creates, counts its storage's bytes when it is created and subtracts them when the
storage dies (a weakref callback), and keeps the peak. That is what `torch.cuda.max_memory_allocated` reports:
live tensor storages, each rounded up to the caching allocator's 512-byte granule.

How a CPU trace is made to allocate like a CUDA step is in `memory_trace.py`. A quantized base (`model.quantize`) is
traced with stand-in linears that store what the format stores and make the dequantized copies its backend makes
(`quantization.PlannedQuantizedLinear`). Offloaded blocks (`train.offload_blocks`) are counted, not traced: their
frozen weights leave the resident set, and `offload.IN_FLIGHT_BLOCKS` of them come back.

What fits a given GPU (checkpointing, offload, optimizer, quantization) is chosen from these plans in
`memory_fit.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import OptimConfig
from qwen_image_lora.quantization import plan_quantized_linears
from qwen_image_lora.train import optim
from qwen_image_lora.train.adapter import add_lora
from qwen_image_lora.train.block_checkpointing import apply_block_checkpointing, checkpointed_blocks
from qwen_image_lora.train.memory_trace import StorageTracker, build_step_inputs, cuda_like, training_step
from qwen_image_lora.train.offload import IN_FLIGHT_BLOCKS

GiB = 1024**3

# The CUDA caching allocator hands out blocks in multiples of 512 bytes; `memory_allocated` counts blocks.
_CUDA_GRANULE = 512
# Outside `max_memory_allocated` but inside `nvidia-smi`: the CUDA context and kernels (~0.5 GiB on an H100 with
# torch 2.x), cuBLAS/cuDNN workspaces, and what the caching allocator reserves but has not handed out.
# On an H100 (torch 2.11) max_memory_reserved ran 0.3-5.4% above max_memory_allocated across ten configurations.
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
# cuBLAS/cuBLASLt workspaces come from the caching allocator, so they are part of `max_memory_allocated`; on an
# H100 (torch 2.11) the measured peaks sit ~70 MiB above the traced tensors, in every configuration.
CUDA_WORKSPACE_BYTES = 64 * 2**20
FRAGMENTATION = 0.07

# A 1024x1024 image is 64x64 latent tokens (VAE /8, 2x2 packing -> /16).
_PIXELS_PER_LATENT_TOKEN = 16


# --------------------------------------------------------------------------------------------------------------
# What is planned


@dataclass
class StepShape:
    """The tensors of one training step.

    `references` lists the (height, width) in pixels of each condition image of an edit; empty for text-to-image.
    """

    height: int = 1024
    width: int = 1024
    batch_size: int = 1
    prompt_tokens: int = 256
    references: list[tuple[int, int]] = field(default_factory=list)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        return height // _PIXELS_PER_LATENT_TOKEN, width // _PIXELS_PER_LATENT_TOKEN

    @property
    def task(self) -> str:
        return f"edit ({len(self.references)} ref)" if self.references else "t2i"


@dataclass
class PlanInputs:
    """Everything the memory of a step depends on. `checkpoint` is "all", "none" or a list of block indices."""

    transformer_config: dict[str, Any]
    shape: StepShape = field(default_factory=StepShape)
    lora: Any = None  # qwen_image_lora.config.LoRAConfig
    base_dtype: torch.dtype = torch.bfloat16
    mixed_precision: str = "bf16"
    optimizer: str = "adamw"
    max_grad_norm: float | None = 1.0  # null: no clipping
    checkpoint: str | list[int] = "all"
    quantize: str = "none"  # model.quantize
    offload_blocks: int = 0  # the first k blocks stream from CPU memory (they must be checkpointed)
    shards: int = 1  # FSDP2 processes the base and the adapter are sharded across (`memory_fit.sharded`)
    # "cuda": reproduce what the step allocates on a CUDA GPU (CUDA autocast rules, flash/efficient attention,
    # 512-byte granules, the trainer's fused AdamW). "cpu": what the same step allocates on CPU, for testing the tracer.
    profile: str = "cuda"

    @property
    def num_layers(self) -> int:
        return int(self.transformer_config.get("num_layers", 32))


@functools.cache
def largest_bucket(resolution: int, max_aspect: float) -> tuple[int, int]:
    """(height, width) of the bucket with the most pixels at `resolution` for aspect ratios up to `max_aspect`
    (`data.max_aspect`, beyond which the doctor calls an image extreme): the sizing rule rounds sides to multiples
    of 32, so a 1:3.3 image trains at 576x1888, 3.7% over 1024^2 (planned as 1024x1024, a 12 GB edit recipe "fit"
    and traced to 12.12 GiB at 1088x992)."""
    steps = round(1000 * math.log2(max_aspect))
    sizes = (qmodel.fit_size(round(1024 * 2 ** (i / 1000)), 1024, resolution) for i in range(-steps, steps + 1))
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    return height, width


def plan_inputs_from_config(
    cfg,
    *,
    references: int = 0,
    prompt_tokens: int = 256,
    checkpoint: str | list[int] | None = None,
    transformer_config: dict[str, Any] | None = None,
    bucket: tuple[int, int] | None = None,
) -> PlanInputs:
    """`PlanInputs` for a loaded `qwen_image_lora.config.Config` at `bucket` (height, width; default: its largest,
    `largest_bucket`).

    `references` condition images of the same size make it an edit step. `checkpoint` overrides
    `train.gradient_checkpointing` (true -> "all", false -> "none"; "auto" is the caller's business).
    """
    height, width = bucket or largest_bucket(cfg.data.resolution, cfg.data.max_aspect)
    if checkpoint is None:
        gc = cfg.train.gradient_checkpointing
        checkpoint = "all" if gc is True or gc == "auto" else "none"
    return PlanInputs(
        transformer_config=transformer_config
        or qmodel.load_transformer_config(cfg.model.pretrained, cfg.model.revision),
        shape=StepShape(height, width, cfg.train.batch_size, prompt_tokens, [(height, width)] * references),
        lora=dataclasses.replace(cfg.lora, init_from=None, init="default"),  # same shapes, no file reads
        base_dtype=getattr(torch, cfg.model.dtype),
        mixed_precision=cfg.train.mixed_precision,
        optimizer=cfg.optim.name,
        max_grad_norm=cfg.optim.max_grad_norm,
        checkpoint=checkpoint,
        quantize=cfg.model.quantize,
        offload_blocks=cfg.train.offload_blocks if isinstance(cfg.train.offload_blocks, int) else 0,
    )


def _autocast(inputs: PlanInputs):
    """The autocast the trainer (accelerate) wraps the forward in; CPU autocast stands in for CUDA's."""
    if inputs.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if inputs.mixed_precision == "bf16" else torch.float16
    return torch.autocast("cpu", dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    """Bytes of one training step; `peak` is what `torch.cuda.max_memory_allocated` would report."""

    inputs: PlanInputs
    peak: int
    workspace: int
    frozen_weights: int
    lora_params: int
    lora_grads: int
    optimizer_state: int
    step_inputs: int
    trainable_numel: int
    checkpointed: list[int]
    trace_seconds: float
    block_weights: int = 0  # frozen bytes of one transformer block
    offloaded: int = 0  # blocks whose frozen weights stream from CPU memory
    shards: int = 1  # FSDP2 processes sharing the weights (`memory_fit.sharded`)

    @property
    def host_bytes_per_step(self) -> int:
        """Bytes copied host -> GPU per step: each offloaded block in forward and again for its recompute in
        backward, except the last one (it stays for backward) and the first (from backward into the next forward;
        `offload.BlockOffloader`)."""
        return max(0, 2 * self.offloaded - 2) * self.block_weights

    @property
    def activations(self) -> int:
        """Activations, gradients in flight and temporaries at the peak."""
        rest = self.frozen_weights + self.lora_params + self.optimizer_state + self.step_inputs + self.workspace
        rest += self.in_flight
        return self.peak - rest

    @property
    def in_flight(self) -> int:
        """Frozen bytes of offloaded blocks on the GPU at once, at most."""
        return min(self.offloaded, IN_FLIGHT_BLOCKS) * self.block_weights

    @property
    def overhead(self) -> int:
        return CUDA_CONTEXT_BYTES + int(FRAGMENTATION * self.peak)

    @property
    def total(self) -> int:
        """Device memory to have: the allocated peak plus the CUDA context and allocator slack."""
        return self.peak + self.overhead

    def fits(self, gpu_bytes: int) -> bool:
        return self.total <= gpu_bytes

    def format(self, gpu_bytes: int | None = None) -> str:
        s, i = self.inputs.shape, self.inputs
        ck = self.checkpointed
        ck_text = "none" if not ck else ("all" if len(ck) >= i.num_layers else f"{len(ck)}/{i.num_layers} blocks")
        lora = i.lora
        grads, context = _gib(self.lora_grads).strip(), _gib(CUDA_CONTEXT_BYTES).strip()
        frag = f"{FRAGMENTATION:.0%}"
        base = str(i.base_dtype).removeprefix("torch.") + ("" if i.quantize == "none" else f", blocks {i.quantize}")
        resident = f"{i.num_layers - self.offloaded} of {i.num_layers} blocks" if self.offloaded else ""
        if self.shards > 1:
            resident = f"FSDP2: 1/{self.shards} of each block, plus the blocks gathered around their use"
        rows = [
            (f"frozen weights ({base})", self.frozen_weights, resident),
            (f"LoRA params (fp32, {self.trainable_numel / 1e6:.1f}M)", self.lora_params, ""),
            (f"optimizer state ({i.optimizer})", self.optimizer_state, ""),
            ("step inputs (latents, text)", self.step_inputs, ""),
            ("cuBLAS workspaces", self.workspace, ""),
            *([("offloaded blocks in flight", self.in_flight, f"at most {IN_FLIGHT_BLOCKS} of {self.offloaded}")]
              if self.offloaded else []),
            ("activations, grads, temporaries", self.activations, f"at the peak; LoRA grads are {grads}"),
            ("= peak allocated", self.peak, "what torch.cuda.max_memory_allocated reports"),
            (f"+ CUDA context + {FRAGMENTATION:.0%} fragmentation", self.overhead, f"{context} + {frag} of the peak"),
            ("= needed on the GPU", self.total, ""),
        ]  # fmt: skip
        lines = [
            f"step: {s.task}, {s.width}x{s.height}, batch {s.batch_size}, prompt {s.prompt_tokens} tokens; "
            f"LoRA r{lora.rank} on {lora.target_modules}; {i.optimizer}; mixed precision {i.mixed_precision}; "
            f"checkpointing {ck_text}",
            *(f"  {label:<36}{_gib(value)}" + (f"   ({note})" if note else "") for label, value, note in rows),
        ]
        if gpu_bytes:
            verdict = "fits" if self.fits(gpu_bytes) else "does NOT fit"
            lines.append(f"  {verdict} in {gpu_bytes / GiB:.1f} GiB ({(gpu_bytes - self.total) / GiB:+.1f} GiB spare)")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


# Optimizer state bytes per trainable parameter for optimizers the trace stands in for with AdamW.
_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8.0 / 256, "prodigy": 16.0}


def plan_memory(inputs: PlanInputs) -> MemoryPlan:
    """Trace a training step of the configured model on fake tensors, with the optimizer state already
    allocated (as in every step after the first), and return its peak."""
    start = time.perf_counter()
    cuda = inputs.profile == "cuda"
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    transformer, params = _build_model(inputs, preserve_rng_state=not cuda, fake_mode=fake_mode)
    batch = build_step_inputs(inputs.shape, inputs.transformer_config, inputs.base_dtype, fake_mode)
    tracker = StorageTracker(fake_mode, granule=_CUDA_GRANULE if cuda else 1)
    plan = _trace(transformer, params, batch, inputs, tracker, fake_mode, cuda)
    plan.trace_seconds = time.perf_counter() - start
    return plan


def measure_memory(inputs: PlanInputs, seed: int = 0) -> MemoryPlan:
    """The same step on real CPU tensors with the same tracker: the ground truth for `plan_memory` on
    models small enough to run (tests). Needs `inputs.profile == "cpu"`."""
    if inputs.profile != "cpu":
        raise ValueError("measure_memory runs on CPU; use profile='cpu'")
    start = time.perf_counter()
    torch.manual_seed(seed)
    transformer, params = _build_model(inputs, preserve_rng_state=True)
    batch = build_step_inputs(inputs.shape, inputs.transformer_config, inputs.base_dtype)
    tracker = StorageTracker(None, granule=1)
    plan = _trace(transformer, params, batch, inputs, tracker, None, cuda=False)
    plan.trace_seconds = time.perf_counter() - start
    return plan


def _build_model(inputs: PlanInputs, preserve_rng_state: bool, fake_mode=None):
    """The transformer in its load dtype with the trainer's LoRA adapter (fp32) and block checkpointing.

    With `fake_mode` the model is built on the meta device (no memory, no init cost) and every tensor is then
    swapped for a fake CPU tensor of the same shape and dtype.
    """
    with torch.device("meta") if fake_mode is not None else contextlib.nullcontext():
        transformer = qmodel.transformer_class()(**inputs.transformer_config)
        torch.nn.Module.to(transformer, inputs.base_dtype)  # diffusers' `to` warns about fp32 modules it has none of
        plan_quantized_linears(qmodel.transformer_blocks(transformer), inputs.quantize)
        params = add_lora(transformer, inputs.lora)
    if fake_mode is not None:
        _fake_from_meta(transformer, fake_mode)
        params = [p for p in transformer.parameters() if p.requires_grad]
    transformer.train()
    n = inputs.num_layers
    ck = inputs.checkpoint
    blocks = list(range(n)) if ck == "all" else [] if ck == "none" else list(ck)
    apply_block_checkpointing(transformer, blocks, preserve_rng_state=preserve_rng_state)
    return transformer, params


def _fake_from_meta(module: torch.nn.Module, fake_mode) -> None:
    convert = fake_mode.fake_tensor_converter.from_meta_and_device
    cpu = torch.device("cpu")

    def fake(t: torch.Tensor) -> torch.Tensor:
        return convert(fake_mode, t, cpu) if t.is_meta else t

    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = fake(b)
        for name, value in vars(m).items():  # plain tensor attributes, e.g. the RoPE frequency tables
            if isinstance(value, torch.Tensor):
                setattr(m, name, fake(value))
            elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
                setattr(m, name, [fake(v) for v in value])


def _trace(
    transformer, params, batch, inputs: PlanInputs, tracker: StorageTracker, fake_mode, cuda: bool
) -> MemoryPlan:
    autocast_dtype = torch.float16 if inputs.mixed_precision == "fp16" else torch.bfloat16
    trainable = {id(p) for p in params}
    frozen = [t for t in list(transformer.parameters()) + list(transformer.buffers()) if id(t) not in trainable]
    optimizer = optim.build_optimizer(params, OptimConfig(name="adamw"))  # the trainer's AdamW (fused kernel)
    mode_ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with mode_ctx, cuda_like(autocast_dtype, cuda), tracker:
        tracker.track(*frozen)
        frozen_bytes = tracker.live
        tracker.track(*params)
        lora_bytes = tracker.live - frozen_bytes
        prompt = batch.prompt
        tracker.track(batch.latents, *batch.cond_latents, prompt.embeds, prompt.image_pad)
        inputs_bytes = tracker.live - frozen_bytes - lora_bytes
        step = functools.partial(
            training_step, transformer, batch, optimizer, params, _autocast(inputs), inputs.max_grad_norm,
            inputs.base_dtype,
        )  # fmt: skip
        for p in params:  # one step on zero gradients allocates the optimizer state, as step 1 would
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state_bytes = tracker.live - frozen_bytes - lora_bytes - inputs_bytes
        tracker.reset_peak()
        step()
        peak = tracker.peak
    numel = sum(p.numel() for p in params)
    modelled_state = int(_STATE_BYTES.get(inputs.optimizer, 8.0) * numel)
    peak += modelled_state - state_bytes  # the trace ran AdamW; other optimizers keep a different state
    workspace = CUDA_WORKSPACE_BYTES if cuda else 0
    granule = tracker.granule
    block = qmodel.transformer_blocks(transformer)[0]
    block_weights = sum(
        -(-t.numel() * t.element_size() // granule) * granule
        for t in [*block.parameters(), *block.buffers()]
        if not t.requires_grad
    )
    plan = MemoryPlan(
        inputs=inputs,
        peak=peak + workspace,
        workspace=workspace,
        frozen_weights=frozen_bytes,
        lora_params=lora_bytes,
        lora_grads=lora_bytes,
        optimizer_state=modelled_state,
        step_inputs=inputs_bytes,
        trainable_numel=numel,
        checkpointed=checkpointed_blocks(transformer),
        trace_seconds=0.0,
        block_weights=block_weights,
    )
    return with_settings(plan, offload_blocks=inputs.offload_blocks)


def with_settings(plan: MemoryPlan, *, optimizer: str | None = None, offload_blocks: int | None = None) -> MemoryPlan:
    """The same traced step with another optimizer (whose state is modelled, not traced) or another number of
    offloaded blocks (counted, not traced: their frozen weights leave the resident set and at most
    `IN_FLIGHT_BLOCKS` come back), without tracing again. Offloaded blocks must be checkpointed."""
    optimizer = plan.inputs.optimizer if optimizer is None else optimizer
    k = plan.offloaded if offload_blocks is None else offload_blocks
    if not set(range(k)) <= set(plan.checkpointed):
        raise ValueError(f"offloading {k} blocks needs them checkpointed ({len(plan.checkpointed)} are)")
    state = int(_STATE_BYTES.get(optimizer, 8.0) * plan.trainable_numel)
    moved = (k - plan.offloaded) * plan.block_weights
    new = dataclasses.replace(
        plan, inputs=dataclasses.replace(plan.inputs, optimizer=optimizer, offload_blocks=k), offloaded=k,
        frozen_weights=plan.frozen_weights - moved, optimizer_state=state,
    )  # fmt: skip
    new.peak = plan.peak - plan.in_flight - moved + new.in_flight + state - plan.optimizer_state
    return new


def budget_for_allocations(gpu_bytes: int) -> int:
    """The allocated-bytes budget on a GPU of `gpu_bytes`, after the context and fragmentation margin."""
    return int((gpu_bytes - CUDA_CONTEXT_BYTES) / (1 + FRAGMENTATION))
