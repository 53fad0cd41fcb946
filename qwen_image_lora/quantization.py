"""`model.quantize`: the frozen base's block linears stored quantized through diffusers' own quantization backends
(torchao weight-only int8 / fp8, bitsandbytes nf4), never hand-written kernels. peft puts fp32 LoRA layers over
them (`TorchaoLoraLinear`, `Linear4bit`), so the adapter trained is a plain LoRA of the unquantized model. What each
format stores is stated here once, for the loader and the memory planner alike."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

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

    @property
    def bytes_per_weight(self) -> float:
        return self.storage.itemsize / self.weights_per_element + self.scale_bytes_per_weight


QUANT_FORMATS = {
    "int8": QuantFormat("torchao", torch.int8, 1, 4, 0.0, True),
    "fp8": QuantFormat("torchao", torch.float8_e4m3fn, 1, 4, 0.0, True),
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
        raise InputError(f"model.quantize: {quantize!r} is not one of none, {', '.join(QUANT_FORMATS)}", "model.quantize")
    backend = QUANT_FORMATS[quantize].backend
    if importlib.util.find_spec(backend) is None:
        raise InputError(f"model.quantize: {quantize} needs the {backend!r} package: pip install {backend}",
                         "model.quantize")
    if quantize == "nf4" and (not torch.cuda.is_available() or device_type not in (None, "cuda")):
        raise InputError("model.quantize: nf4 (bitsandbytes 4-bit) runs on a CUDA GPU only, and this run has none; "
                         "use int8 or fp8 (torchao, CPU too) or none", "model.quantize")


def quantization_config(quantize: str, dtype: torch.dtype):
    """diffusers' quantization config for `model.quantize`: only the repeated blocks' linears are quantized."""
    if QUANT_FORMATS[quantize].backend == "bitsandbytes":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(UNQUANTIZED_MODULES))
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # The config object, not the string name: diffusers 0.42 refuses "int8wo".
    weight_only = Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig()
    return TorchAoConfig(weight_only, modules_to_not_convert=list(UNQUANTIZED_MODULES))
