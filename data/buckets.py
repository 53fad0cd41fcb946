"""Aspect-ratio buckets and the resize + crop that puts an image into one.

Every image gets the size the pipeline itself would give it (`model.fit_size`: multiples of 32, area ~
resolution^2 at the image's aspect); a size that would need more than `max_upscale` is shrunk instead. The resize covers the bucket and a crop (centre or
seeded random) cuts it to size. An edit pair's target and every reference image of the same size share one
`Transform`, so their pixels stay aligned: a misaligned pair teaches the adapter to shift the image.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from qwen_image_lora import model as qmodel

def assign_bucket(width: int, height: int, resolution: int, max_upscale: float = 1.0) -> tuple[int, int]:
    """The size an image trains at: the pipeline's own size for it (`model.fit_size`, the one sizing rule), shrunk
    when reaching it would upscale more than `max_upscale`."""
    bw, bh = qmodel.fit_size(width, height, resolution)
    scale = max(bw / width, bh / height)
    if scale > max_upscale:
        shrink, side = max_upscale / scale, qmodel.SIDE_MULTIPLE
        bw, bh = max(side, int(bw * shrink) // side * side), max(side, int(bh * shrink) // side * side)
    return bw, bh


@dataclass(frozen=True)
class Transform:
    """Resize to `resized`, then crop the box at (left, top) of size `bucket`."""

    resized: tuple[int, int]
    left: int
    top: int
    bucket: tuple[int, int]

    def apply(self, image: Image.Image) -> Image.Image:
        if image.size != self.resized:
            image = image.resize(self.resized, Image.Resampling.LANCZOS)
        return image.crop((self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1]))


def plan_transform(size: tuple[int, int], bucket: tuple[int, int], crop: str = "center", seed: int = 0) -> Transform:
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if crop == "random":
        rng = random.Random(seed)
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return Transform((rw, rh), left, top, bucket)


def histogram(buckets: list[tuple[int, int]]) -> str:
    """A printable bucket histogram, most used first."""
    counts = Counter(buckets)
    width = max(counts.values())
    return "\n".join(
        f"  {w:>5}x{h:<5} {n:>6}  {'#' * max(1, round(40 * n / width))}" for (w, h), n in counts.most_common()
    )
