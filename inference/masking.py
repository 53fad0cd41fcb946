"""Masked edits: the model may change only where the mask is white; everything under black comes back as it was.

Two layers make that hold. During sampling, `LatentBlend` (the pipeline's `callback_on_step_end`) replaces the
kept region's latents after every step with the input's own latents noised to that step's sigma (the standard
inpainting blend), so the model composes the changed region around the real product instead of redrawing it.
After decoding, `composite` pastes the result over the input through the mask, feathered only *into* the changed
region: the two mix over at most `feather` px next to the kept region, every pixel deeper in is the result's and
every kept pixel is the input's, exactly (alpha included for RGBA inputs).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import distance_transform_edt

from qwen_image_lora import model as qmodel


def latent_mask(mask: Image.Image, width: int, height: int, device, dtype) -> torch.Tensor:
    """[1, h*w, 1] in [0, 1], packed like the pipeline's latents: 1 where a latent may change. A latent is
    changeable when any pixel it covers is (max-pool), so the model may repaint the whole border latent."""
    grid = (width // qmodel.LATENT_PIXELS, height // qmodel.LATENT_PIXELS)
    resized = np.asarray(mask.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    pixels = torch.from_numpy(resized).view(1, 1, height, width)
    pooled = torch.nn.functional.max_pool2d(pixels, qmodel.LATENT_PIXELS)
    return (pooled > 0.5 / 255).to(dtype).view(1, grid[0] * grid[1], 1).to(device)


class LatentBlend:
    """`callback_on_step_end` for `QwenImage21Pipeline`: after each step, the kept latents are the input's
    latents noised to the sigma the latents are now at (sigma 0 after the last step: the input itself).

    `last_kept` holds the kept-region target of the last call, for tests and debugging.
    """

    def __init__(self, pipe, image: Image.Image, mask: Image.Image, width: int, height: int, seed: int):
        device, dtype = pipe._execution_device, pipe.transformer.dtype
        pixels = qmodel.image_to_pixels(pipe, image.resize((width, height), Image.Resampling.LANCZOS))
        self.x0 = qmodel.pack(qmodel.encode_latents(pipe, pixels)).to(device, dtype)  # [1, h*w, C]
        self.mask = latent_mask(mask, width, height, device, dtype)
        generator = torch.Generator("cpu").manual_seed(seed + 1)  # not the pipeline's stream: its draws stay unchanged
        self.noise = torch.randn(self.x0.shape, generator=generator, dtype=torch.float32).to(device, dtype)
        self.last_kept: torch.Tensor | None = None

    def __call__(self, pipe, step: int, timestep, tensors: dict) -> dict:
        latents = tensors["latents"]
        sigma = float(pipe.scheduler.sigmas[pipe.scheduler.step_index])
        kept = (1 - sigma) * self.x0 + sigma * self.noise
        self.last_kept = kept
        return {"latents": self.mask * latents + (1 - self.mask) * kept}


def feathered_alpha(mask: Image.Image, feather: int) -> Image.Image:
    """The mask as compositing alpha over the changed region (mask >= 128): 0 on the kept region, a linear ramp over
    the `feather` px next to it (a pixel d px in gets d / (feather + 1)), 255 further in."""
    changed = np.asarray(mask.convert("L")) >= 128
    if feather <= 0 or changed.all():  # the distance transform needs a kept pixel to measure from
        return Image.fromarray(changed.astype(np.uint8) * 255, "L")
    depth = distance_transform_edt(changed)  # Euclidean px to the nearest kept pixel: the ramp is exactly that wide
    alpha = np.where(depth > feather, 255, np.rint(255 * depth / (feather + 1)))
    return Image.fromarray(alpha.astype(np.uint8), "L")


def grow(mask: Image.Image, pixels: int) -> Image.Image:
    """Binary: white on every pixel the mask is not black on, and on every pixel within `pixels` px of one. An edit
    through it with `feather` = `pixels` mixes only outside the mask, so it leaves none of the input under it."""
    reach = distance_transform_edt(np.asarray(mask.convert("L")) == 0)  # px to the nearest non-black pixel
    if reach.all():  # nothing to grow from (the transform needs a zero)
        return Image.new("L", mask.size, 0)
    return Image.fromarray((reach <= pixels).astype(np.uint8) * 255, "L")


def composite(result: Image.Image, original: Image.Image, mask: Image.Image, feather: int = 8) -> Image.Image:
    """`result` over `original` (same size) through `feathered_alpha(mask)`: black mask pixels give the
    original's pixels exactly (alpha included)."""
    if result.size != original.size:
        result = result.resize(original.size, Image.Resampling.LANCZOS)
    weight = feathered_alpha(mask, feather)
    if "A" not in original.getbands():  # the input's mode: an RGB product stays RGB
        out = original.convert("RGB")
        out.paste(result.convert("RGB"), (0, 0), weight)
        return out
    return _mix_premultiplied(np.asarray(result.convert("RGBA")), np.asarray(original.convert("RGBA")), weight)


def _mix_premultiplied(result: np.ndarray, original: np.ndarray, weight: Image.Image) -> Image.Image:
    """The feather band of a transparent input, mixed as colour times alpha: a plain per-channel mix (PIL's paste)
    brought in the colour hidden under its transparent pixels, a dark halo around a cut-out. Weight 0 keeps the
    original's pixels exactly (its hidden colour too), 255 takes the result's."""
    w = np.asarray(weight, dtype=np.float64)[..., None] / 255.0
    res_a, org_a = result[..., 3:] / 255.0, original[..., 3:] / 255.0
    alpha = w * res_a + (1 - w) * org_a
    colour = w * res_a * result[..., :3] + (1 - w) * org_a * original[..., :3]
    colour = np.divide(colour, alpha, out=original[..., :3].astype(np.float64), where=alpha > 0)
    mixed = np.concatenate([colour, alpha * 255.0], axis=-1).round().clip(0, 255).astype(np.uint8)
    edge = np.asarray(weight)
    mixed[edge == 0], mixed[edge == 255] = original[edge == 0], result[edge == 255]
    return Image.fromarray(mixed, "RGBA")
