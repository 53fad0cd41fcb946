"""Aspect-ratio buckets and the resize + crop that puts an image into one.

Every image gets the bucket (multiples of 32, area <= resolution^2) with the nearest aspect ratio; a bucket
that would need more than `max_upscale` is shrunk instead. The resize covers the bucket and a crop (centre or
seeded random) cuts it to size. An edit pair's target and every reference image of the same size share one
`Transform`, so their pixels stay aligned: a misaligned pair teaches the adapter to shift the image.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image

SIDE = 32
MAX_ASPECT = 4.0


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """The largest (w, h) multiples of 32 with area <= resolution^2 for each width, aspect within 1:4..4:1."""
    budget = resolution * resolution
    sizes = []
    for w in range(SIDE, resolution * 4 + 1, SIDE):
        h = budget // w // SIDE * SIDE
        if h >= SIDE and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
            sizes.append((w, h))
    return sizes


def assign_bucket(width: int, height: int, resolution: int, max_upscale: float = 1.0) -> tuple[int, int]:
    """The bucket for an image of this size (nearest log aspect ratio, shrunk to respect max_upscale)."""
    aspect = math.log(width / height)
    bw, bh = min(bucket_sizes(resolution), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
    scale = max(bw / width, bh / height)
    if scale > max_upscale:
        shrink = max_upscale / scale
        bw, bh = max(SIDE, int(bw * shrink) // SIDE * SIDE), max(SIDE, int(bh * shrink) // SIDE * SIDE)
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
