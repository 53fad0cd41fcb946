"""The one sampling path: training previews, evaluation, the CLI, batch jobs and the HTTP service all call
`Generator.generate`, so a preview at seed s is the image a user gets at seed s."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from PIL import Image

from qwen_image_lora import model as qmodel

# Aspect-ratio presets, mapped to multiples of 32 within the pixel budget by `size_for_aspect`.
ASPECT_RATIOS = {"1:1": (1, 1), "16:9": (16, 9), "9:16": (9, 16), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3)}


def size_for_aspect(aspect_ratio: str, resolution: int = 1024) -> tuple[int, int]:
    """(width, height): multiples of 32 whose area stays within resolution^2."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"aspect_ratio: {aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}")
    a, b = ASPECT_RATIOS[aspect_ratio]
    w, h = qmodel.fit_size(a * 1000, b * 1000, resolution)
    while w * h > resolution * resolution:  # rounding can overshoot the budget by a row of tokens
        w, h = (w - 32, h) if w / h > a / b else (w, h - 32)
    return w, h


@dataclass
class GenerationRequest:
    prompt: str
    images: list[Image.Image] = field(default_factory=list)  # 0 = text-to-image, 1..10 = edit
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None
    num_inference_steps: int | None = None  # None = the pipeline's default
    guidance_scale: float | None = None  # maps onto the pipeline's `true_cfg_scale`
    seed: int = 0
    # Edits come back at the input's size unless this is False (then at the model's working size).
    keep_input_size: bool = True


class Generator:
    """Wraps a loaded `QwenImage21Pipeline` (with or without adapters) and samples from it."""

    def __init__(self, pipeline, resolution: int = 1024):
        self.pipe = pipeline
        self.resolution = resolution
        defaults = inspect.signature(type(pipeline).__call__).parameters
        self.default_steps = defaults["num_inference_steps"].default
        self.default_guidance = defaults["true_cfg_scale"].default

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> Image.Image:
        width, height = self._size(request)
        guidance = self.default_guidance if request.guidance_scale is None else request.guidance_scale
        kwargs = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            true_cfg_scale=guidance,
            width=width,
            height=height,
            num_inference_steps=request.num_inference_steps or self.default_steps,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_resolution=self.resolution,
        )
        if request.images:
            kwargs["image"] = [qmodel.to_rgba(im) for im in request.images]
        image = self.pipe(**kwargs).images[0]
        if request.images and request.keep_input_size and request.width is None and request.aspect_ratio is None:
            # The model ran at the nearest supported size; give the catalogue image its own size back.
            image = image.resize(request.images[-1].size, Image.Resampling.LANCZOS)
        return image

    def _size(self, request: GenerationRequest) -> tuple[int | None, int | None]:
        if request.aspect_ratio is not None:
            if request.width or request.height:
                raise ValueError("give either aspect_ratio or width/height, not both")
            return size_for_aspect(request.aspect_ratio, self.resolution)
        for name in ("width", "height"):
            value = getattr(request, name)
            if value is not None and (value <= 0 or value % qmodel.SIDE_MULTIPLE):
                raise ValueError(f"{name}: must be a positive multiple of {qmodel.SIDE_MULTIPLE} (got {value})")
        if request.images:
            # Edits run at the last reference image's aspect within the budget (the pipeline's own rule).
            w, h = request.images[-1].size
            fw, fh = qmodel.fit_size(w, h, self.resolution)
            return request.width or fw, request.height or fh
        return request.width or self.resolution, request.height or self.resolution
