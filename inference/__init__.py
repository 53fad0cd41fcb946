"""Inference: one sampling path (`Generator`), adapters loaded once and chosen per call, batch jobs, HTTP service."""

from qwen_image_lora.adapter_format import AdapterError
from qwen_image_lora.inference.adapters import Adapters
from qwen_image_lora.inference.generator import ASPECT_RATIOS, GenerationRequest, Generator, size_for_aspect

__all__ = ["ASPECT_RATIOS", "AdapterError", "Adapters", "GenerationRequest", "Generator", "size_for_aspect"]
