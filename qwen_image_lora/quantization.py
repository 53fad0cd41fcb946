"""`model.quantize`: the frozen base's block linears stored quantized through diffusers' own quantization backends
(torchao weight-only int8 / fp8, bitsandbytes nf4), never hand-written kernels. peft puts fp32 LoRA layers over
them (`TorchaoLoraLinear`, `Linear4bit`), so the adapter trained is a plain LoRA of the unquantized model. What each
format stores is stated here once, for the loader and the memory planner alike."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from diffusers import BitsAndBytesConfig, TorchAoConfig

from qwen_image_lora.errors import InputError


@dataclass(frozen=True)
class QuantFormat:
    """How `model.quantize` stores a block linear's weight (what the memory planner counts)."""

    backend: str  # the diffusers quantization backend
    storage: torch.dtype  # dtype of the stored weight elements (nf4 packs two weights per uint8)
    weights_per_element: int
    scale_bytes_per_row: int  # torchao weight-only: one fp32 scale per output row
    scale_bytes_per_weight: float  # bitsandbytes nf4, double-quantized: a uint8 absmax per 64, an fp32 per 64*256
    # torchao dequantizes at the Python level, so autograd keeps a full-precision copy of the weight for backward;
    # bitsandbytes' MatMul4Bit keeps the packed weight and dequantizes again in backward.
    keeps_dequantized: bool
    # torchao's fp8 dequantizes through two fp32 temporaries (qdata.float() * scale) on its way to the compute dtype.
    dequantizes_in_fp32: bool = False

    @property
    def bytes_per_weight(self) -> float:
        return self.storage.itemsize / self.weights_per_element + self.scale_bytes_per_weight


QUANT_FORMATS = {
    "int8": QuantFormat("torchao", torch.int8, 1, 4, 0.0, True),
    "fp8": QuantFormat("torchao", torch.float8_e4m3fn, 1, 4, 0.0, True, dequantizes_in_fp32=True),
    "nf4": QuantFormat("bitsandbytes", torch.uint8, 2, 0, 1 / 64 + 4 / (64 * 256), False),
}
# Outside the repeated blocks: the embeddings, the shared modulation and the output layer stay in model.dtype.
UNQUANTIZED_MODULES = ["time_text_embed", "txt_in", "img_in", "modulation", "norm_out", "proj_out"]


def check_quantize(quantize: str, device_type: str | None = None) -> None:
    """Raise naming `model.quantize` when its backend is not installed or cannot run on this machine (nf4 needs
    CUDA; `device_type` is the training device when known). Called before any weights load."""
    if quantize == "none":
        return
    if quantize not in QUANT_FORMATS:
        raise InputError(
            f"model.quantize: {quantize!r} is not one of none, {', '.join(QUANT_FORMATS)}", "model.quantize"
        )
    backend = QUANT_FORMATS[quantize].backend
    if importlib.util.find_spec(backend) is None:
        raise InputError(
            f"model.quantize: {quantize} needs the {backend!r} package: pip install {backend}", "model.quantize"
        )
    if quantize == "nf4" and (not torch.cuda.is_available() or device_type not in (None, "cuda")):
        raise InputError(
            "model.quantize: nf4 (bitsandbytes 4-bit) runs on a CUDA GPU only, and this run has none; "
            "use int8 or fp8 (torchao, CPU too) or none",
            "model.quantize",
        )


def quantization_config(quantize: str, dtype: torch.dtype):
    """diffusers' quantization config for `model.quantize`: only the repeated blocks' linears are quantized."""
    if QUANT_FORMATS[quantize].backend == "bitsandbytes":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=list(UNQUANTIZED_MODULES),
        )
    from torchao.quantization import (  # noqa: PLC0415 - torchao: the `quant` extra (check_quantize names it)
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
    )

    # The config object, not the string name: diffusers 0.42 refuses "int8wo".
    weight_only = Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig()
    return TorchAoConfig(weight_only, modules_to_not_convert=list(UNQUANTIZED_MODULES))


# ------------------------------------------------------------------------------------------ what the planner traces


class PlannedQuantizedLinear(torch.nn.Linear):
    """A block linear as `model.quantize` stores it, for the memory planner's trace (meta or fake tensors): the
    stored weight and scales, and the full-precision copy of the weight the backend makes for each matmul (kept for
    backward by torchao, made again in backward by bitsandbytes). The values are not the model's."""

    def __init__(self, linear: torch.nn.Linear, quantize: str):
        torch.nn.Module.__init__(self)
        fmt = QUANT_FORMATS[quantize]
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt
        self.compute_dtype = linear.weight.dtype
        device, numel = linear.weight.device, linear.weight.numel()
        stored = (self.out_features, self.in_features) if fmt.weights_per_element == 1 else (numel // 2,)
        self.weight = torch.nn.Parameter(torch.empty(stored, dtype=fmt.storage, device=device), requires_grad=False)
        scales = self.out_features * fmt.scale_bytes_per_row + round(numel * fmt.scale_bytes_per_weight)
        self.register_buffer("scales", torch.empty(scales, dtype=torch.uint8, device=device))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt.dequantizes_in_fp32:  # torchao fp8: (qdata.float() * scale).to(dtype), kept by autograd
            scale = self.scales[: 4 * self.out_features].view(torch.float32).view(-1, 1)
            out = torch.nn.functional.linear(x, (self.weight.to(torch.float32) * scale).to(self.compute_dtype))
        elif self.fmt.keeps_dequantized:  # torchao int8: mm(x, qdata.t().to(dtype)) * scale, the copy kept
            out = torch.nn.functional.linear(x, self.weight.to(self.compute_dtype))
        else:
            out = _Dequantized.apply(x, self.weight, (self.out_features, self.in_features), self.compute_dtype)
        return out if self.bias is None else out + self.bias


class _Dequantized(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit: a dequantized weight in forward, another in backward, only the packed one kept."""

    @staticmethod
    def forward(ctx, x, packed, shape, dtype):
        ctx.save_for_backward(packed)
        ctx.shape, ctx.dtype = shape, dtype
        return torch.nn.functional.linear(x, packed.new_zeros(shape, dtype=dtype))

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return grad @ packed.new_zeros(ctx.shape, dtype=ctx.dtype).to(grad.dtype), None, None, None


def plan_quantized_linears(blocks: torch.nn.Module, quantize: str) -> None:
    """Swap every linear inside the repeated `blocks` for its `PlannedQuantizedLinear` (before LoRA is added)."""
    if quantize == "none":
        return
    for name, module in list(blocks.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, PlannedQuantizedLinear(child, quantize))
