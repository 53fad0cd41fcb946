"""Count what a training step allocates, on fake tensors, the way a CUDA GPU would (used by `memory.py`).

`StorageTracker` (a `TorchDispatchMode`) sees every tensor an op creates, counts its storage's bytes when it is
created and subtracts them when the storage dies (a weakref callback), and keeps the peak: what
`torch.cuda.max_memory_allocated` reports. `cuda_like` makes a CPU trace allocate like a CUDA step (CUDA
autocast rules, the flash / memory-efficient attention kernels).

Three things make a CPU trace behave like the GPU run:

- CUDA autocast: the trace runs on CPU tensors under CPU autocast, whose op lists differ from CUDA's (CUDA runs
  `layer_norm`, `rsqrt`, `pow`, `sum`, ... in fp32). `_cuda_autocast_rules` registers the CUDA rules on the
  AutocastCPU key for the duration of the trace.
- attention: on an H100 `scaled_dot_product_attention` runs the flash kernel (no mask) or the memory-efficient
  kernel (with a mask), which keep only the output and a log-sum-exp for backward; the CPU default would
  materialise the score matrix. `_cuda_sdpa` calls those kernels' ops directly (they have fake kernels).
- data-dependent metadata: the transformer reads its image/text layout with `.tolist()` and boolean masks.
  `StorageTracker` runs any op whose inputs are all real (the small masks and index tensors) for real, and
  only fakes ops that touch a fake tensor, so the layout code runs unchanged on real values.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from qwen_image_lora import objective
from qwen_image_lora.model import PromptEmbeds

if TYPE_CHECKING:
    from qwen_image_lora.train.memory import StepShape

# Each vision-language image slot of the prompt stands for 2x2 latent tokens.
_TOKENS_PER_SLOT = 4

# --------------------------------------------------------------------------------------------------------------
# The traced step


def build_step_inputs(
    shape: StepShape, transformer_config: dict[str, Any], dtype: torch.dtype, fake_mode=None
) -> SimpleNamespace:
    """A training batch as the data pipeline hands it to `objective.flow_matching_loss`.

    `latents` [B, C, 1, h, w] fp32 (a 1024x1024 image is h = w = 64), `cond_latents` one such tensor per
    reference image, `prompt` a `PromptEmbeds`: `embeds` [B, L, context_in_dim] in the model dtype with
    L = prompt tokens + one vision slot per 2x2 group of each reference's latents, `image_pad` [B, L] bool
    marking those slots, `mask` None (nothing padded at batch 1) or [B, L] bool.
    The masks are always real tensors (their values decide the sequence layout); with `fake_mode` the rest are
    fake.
    """

    def big(*size, dtype=torch.float32):
        if fake_mode is None:
            return torch.randn(*size, dtype=dtype)
        meta = torch.empty(*size, dtype=dtype, device="meta")
        return fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, meta, torch.device("cpu"))

    b, c = shape.batch_size, int(transformer_config.get("in_channels", 64))
    ctx = int(transformer_config.get("context_in_dim", 4096))
    grids = [shape.latent_grid(h, w) for h, w in shape.references]
    # Vision slots sit inside the prompt: a few text tokens, each reference's slots, then the rest of the prompt.
    text_before = min(8, shape.prompt_tokens)
    parts = [torch.zeros(text_before, dtype=torch.bool)]
    parts += [torch.ones(h * w // _TOKENS_PER_SLOT, dtype=torch.bool) for h, w in grids]
    parts.append(torch.zeros(shape.prompt_tokens - text_before, dtype=torch.bool))
    image_pad = torch.cat(parts).unsqueeze(0).expand(b, -1).clone()
    seq_l = image_pad.shape[1]
    th, tw = shape.latent_grid(shape.height, shape.width)
    return SimpleNamespace(
        latents=big(b, c, 1, th, tw),
        cond_latents=[big(b, c, 1, h, w) for h, w in grids],
        prompt=PromptEmbeds(
            embeds=big(b, seq_l, ctx, dtype=dtype),
            mask=None if b == 1 else torch.ones(b, seq_l, dtype=torch.bool),
            image_pad=image_pad,
        ),
    )


def training_step(transformer, batch, optimizer, params, autocast, max_grad_norm: float | None, dtype) -> torch.Tensor:
    """One optimizer step as `train/lora.py` runs it: `objective.flow_matching_loss` (target tokens only),
    backward, gradient clipping, optimizer step, `zero_grad(set_to_none=True)`."""

    noise = torch.randn(batch.latents.shape, dtype=torch.float32)
    sigmas = torch.rand(batch.latents.shape[0])
    device = batch.latents.device
    with autocast:  # as accelerate wraps the forward
        loss = objective.flow_matching_loss(transformer, batch, noise.to(device), sigmas.to(device), dtype=dtype)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)  # null: measured, not clipped (as the recipe)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# --------------------------------------------------------------------------------------------------------------
# Counting live storages


class StorageTracker(TorchDispatchMode):
    """Live bytes of tensor storages: counted when an op creates a storage, subtracted when it is freed.

    With `fake_mode` set, ops whose tensor inputs are all real run for real (outside fake mode) and the rest run
    under `fake_mode`, so small index/mask tensors keep their values and everything large stays fake. Both real
    and fake storages count: in the planned step every tensor lives on the GPU.
    """

    def __init__(self, fake_mode=None, granule: int = 1, real_factory_limit: int = 1 << 21):
        super().__init__()
        self.fake_mode = fake_mode
        self.granule = granule
        self.real_factory_limit = real_factory_limit
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    # -- accounting
    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors that exist already (weights, inputs)."""
        for t in tensors:
            self._track_out(t)

    def _round(self, n: int) -> int:
        return -(-n // self.granule) * self.granule if n else 0

    def _track_out(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return
        st = t.untyped_storage()
        key = id(st)
        size = self._round(st.nbytes())
        old = self._sizes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(st, functools.partial(self._freed, key))
            self._sizes[key] = size
            self.live += size
        elif old != size:  # resized in place (out= ops, resize_)
            self._sizes[key] = size
            self.live += size - old
        self.peak = max(self.peak, self.live)

    def _freed(self, key: int, _ref) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        self.peak = self.live

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._run(func, args, kwargs) if self.fake_mode is not None else func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            self._track_out(t)
        return out

    def _run(self, func, args, kwargs):

        flat = tree_flatten((args, kwargs))[0]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if any(isinstance(t, FakeTensor) for t in tensors):
            self._check_inplace(func, args, FakeTensor)
            args, kwargs = _bool_indices_to_long(func, args, kwargs)
            return func(*args, **kwargs)
        if tensors or self._small_factory(func, args, kwargs):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _small_factory(self, func, args, kwargs) -> bool:
        if torch.Tag.nondeterministic_seeded in func.tags:
            return False
        size = args[0] if args and isinstance(args[0], (list, tuple)) else kwargs.get("size")
        if size is None:
            return True  # arange, scalar_tensor, ...: small in this model
        return math.prod(int(s) for s in size) <= self.real_factory_limit

    @staticmethod
    def _check_inplace(func, args, fake_cls) -> None:
        schema = func._schema
        if schema.is_mutable and args and isinstance(args[0], torch.Tensor) and not isinstance(args[0], fake_cls):
            if schema.arguments and schema.arguments[0].alias_info and schema.arguments[0].alias_info.is_write:
                raise RuntimeError(
                    f"memory planner: {func} writes fake values into a real tensor; the traced code mixes a "
                    "data-dependent tensor with model activations in place"
                )


_INDEX_OPS = {"aten::index.Tensor", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


def _bool_indices_to_long(func, args, kwargs):
    """Turn real boolean index masks into long indices, as torch does internally, so the fake kernel can size the
    result (a mask's True count is data a fake tensor does not have)."""

    if func._schema.name not in {n.split(".")[0] for n in _INDEX_OPS} or len(args) < 2:
        return args, kwargs
    indices = args[1]

    def real_mask(i) -> bool:
        return isinstance(i, torch.Tensor) and i.dtype == torch.bool and not isinstance(i, FakeTensor)

    if not any(real_mask(i) for i in indices):
        return args, kwargs
    new = []
    with unset_fake_temporarily():
        for i in indices:
            if real_mask(i):
                new.extend(i.nonzero().unbind(1))
            else:
                new.append(i)
    return (args[0], new, *args[2:]), kwargs


# --------------------------------------------------------------------------------------------------------------
# Making a CPU trace allocate like a CUDA step


# CUDA autocast's fp32 list (ATen autocast_mode.h: AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE) minus the ops
# CPU autocast already runs in fp32. These change what is saved for backward in the Qwen block (layer_norm).
_CUDA_FP32_OPS = [
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "cosine_similarity", "dist", "renorm", "logsumexp",
]  # fmt: skip
_CUDA_FP32_OUT_DTYPE_OPS = ["sum", "sum.dim_IntList", "softmax.int", "log_softmax.int", "cumsum", "prod"]


@contextlib.contextmanager
def _cuda_autocast_rules(dtype: torch.dtype) -> Iterator[None]:
    """While active, CPU autocast casts the ops CUDA autocast runs in fp32 to fp32 too."""
    key = torch._C.DispatchKey.AutocastCPU
    lib = torch.library.Library("aten", "IMPL")

    def cast(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x

    def make(op, set_dtype: bool):
        def kernel(*args, **kwargs):
            if set_dtype:
                eligible = isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.float16, torch.bfloat16)
                if eligible and kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            else:
                args, kwargs = tree_map(cast, (args, kwargs))
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
                return op(*args, **kwargs)

        return kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for names, set_dtype in ((_CUDA_FP32_OPS, False), (_CUDA_FP32_OUT_DTYPE_OPS, True)):
            for name in names:
                base, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, base), overload or "default")
                if set_dtype and "dtype" not in [a.name for a in op._schema.arguments]:
                    continue
                lib.impl(name, make(op, set_dtype), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` as an H100 runs it: the flash kernel without a mask (bf16/fp16, head dim
    <= 256), else the memory-efficient kernel with the mask as an additive bias."""
    if enable_gqa:
        raise NotImplementedError("memory planner: grouped-query attention is not modelled")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, return_debug_mask=False, scale=scale
        )
        return out[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale
    )
    return out[0]


@contextlib.contextmanager
def cuda_like(dtype: torch.dtype, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _cuda_sdpa
    try:
        with _cuda_autocast_rules(dtype):
            yield
    finally:
        F.scaled_dot_product_attention = original
