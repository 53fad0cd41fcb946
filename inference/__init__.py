"""Inference: one sampling path (`Generator`), adapters loaded once and chosen per call, batch jobs, HTTP service.

The names below load on first use (PEP 562): `qwen-lora`'s argument parser imports this package's `cli` module,
and its `--help` and argument errors should not wait seconds for torch, diffusers and peft to import."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors and type checkers see
    from qwen_image_lora.errors import AdapterError
    from qwen_image_lora.inference.adapters import Adapters
    from qwen_image_lora.inference.generator import ASPECT_RATIOS, GenerationRequest, Generator, size_for_aspect

_PUBLIC = {
    "AdapterError": "qwen_image_lora.errors",
    "Adapters": "qwen_image_lora.inference.adapters",
    "ASPECT_RATIOS": "qwen_image_lora.inference.generator",
    "GenerationRequest": "qwen_image_lora.inference.generator",
    "Generator": "qwen_image_lora.inference.generator",
    "size_for_aspect": "qwen_image_lora.inference.generator",
}
__all__ = ["ASPECT_RATIOS", "AdapterError", "Adapters", "GenerationRequest", "Generator", "size_for_aspect"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
