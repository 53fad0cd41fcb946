"""Aspect-ratio buckets and the resize + crop that puts an image into one.

Every image gets the size the pipeline itself would give it (`model.fit_size`: multiples of 32, area ~
resolution^2 at the image's aspect); a size that would need more than `max_upscale` is shrunk instead. The resize covers the bucket and a crop (centre or
seeded random) cuts it to size. An edit pair's target and every reference image of the same size share one
`Transform`, so their pixels stay aligned: a misaligned pair teaches the adapter to shift the image.

`BucketBatchSampler` then draws training batches of one layout each, seeded and resumable.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator
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


def short_batches(group_sizes: list[int], batch_size: int) -> tuple[int, int]:
    """(batches an epoch that hold at most half of `batch_size`, all batches an epoch) when each batch is one group's
    (`BucketBatchSampler`): a small bucket makes a short batch, and each of its images weighs more in its step."""
    total = sum(-(-n // batch_size) for n in group_sizes)
    short = sum(1 for n in group_sizes if 0 < n % batch_size <= batch_size // 2)
    return short, total


def stable_int(*parts) -> int:
    """A seed from `parts` that is the same in every process and Python run (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class BucketBatchSampler:
    """Endless, seeded, resumable batches of one layout each, sharded across processes.

    Each epoch shuffles the items inside every layout group, cuts them into batches, and shuffles the batch
    order. Process `rank` of `num_replicas` takes every num_replicas-th batch, so a step's position is the same
    on every rank and one cursor resumes them all.
    """

    def __init__(self, groups: list[list[int]], batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.groups = [g for g in groups if g]
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.position = 0, 0

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(stable_int(self.seed, "epoch", epoch))
        batches = []
        for group in self.groups:
            order = group[:]
            rng.shuffle(order)
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        # Every rank must get the same number of steps per epoch; wrap around to fill the last round.
        batches += (batches * self.num_replicas)[: -len(batches) % self.num_replicas]
        return batches[self.rank :: self.num_replicas]

    def steps_per_epoch(self) -> int:
        return len(self.batches_for_epoch(0))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        while True:
            batches = self.batches_for_epoch(self.epoch)
            while self.position < len(batches):
                position = self.position
                self.position += 1
                yield [(i, self.epoch, position) for i in batches[position]]
            self.epoch, self.position = self.epoch + 1, 0
