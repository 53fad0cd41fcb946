"""Validation during training: fixed-seed text-to-image and edit samples from the config, made with the
current adapter through the one sampling path (`inference.generator.Generator`), so a preview at seed s is
the image a user gets at seed s; plus the held-out flow-matching loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from qwen_image_lora.config import Config
from qwen_image_lora.image_files import save_image
from qwen_image_lora.images import load_image
from qwen_image_lora.inference.generator import GenerationRequest, Generator


def validation_requests(cfg: Config) -> dict[str, GenerationRequest]:
    """name -> request, for every `validation.prompts` (t2i_NN) and `validation.edits` (edit_NN) entry."""
    v = cfg.validation
    quiet = v.quieted()  # said once at start, not at every preview
    requests = {}
    for i, prompt in enumerate(v.prompts):
        requests[f"t2i_{i:02d}"] = GenerationRequest.from_settings(v, prompt, **quiet)
    for i, edit in enumerate(v.edits):
        images = [load_image(p) for p in edit.images]  # as `qwen-lora edit` reads them, so previews match
        requests[f"edit_{i:02d}"] = GenerationRequest.from_settings(v, edit.prompt, images=images, **quiet)
    return requests


def generate_samples(
    pipe, cfg: Config, folder: str | Path, requests: dict[str, GenerationRequest] | None = None
) -> dict[str, Image.Image]:
    """Sample every validation request with whatever adapter `pipe.transformer` carries now; write PNGs into
    `folder`. The training RNG streams are left exactly as they were."""
    requests = validation_requests(cfg) if requests is None else requests
    if not requests:
        return {}
    folder = Path(folder)
    transformer = pipe.transformer
    was_training = transformer.training
    transformer.eval()
    images = {}
    try:
        with torch.random.fork_rng():
            generator = Generator(pipe, resolution=cfg.data.resolution)
            for name, request in requests.items():
                images[name] = generator.generate(request)
                save_image(images[name], folder / f"{name}.png")
    finally:
        transformer.train(was_training)
    return images
