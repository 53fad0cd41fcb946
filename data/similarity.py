"""Image similarity for the data doctor: perceptual hashes, a colour signature, phase correlation and edge
correlation (small numpy functions), and the checks across items built on them: duplicates, near-duplicates,
misaligned edit pairs and edit pairs whose direction is the reverse of the rest."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

NEAR_DUPLICATE_BITS = 6  # pHash Hamming distance (of 64) under which two images may be near duplicates...
# ...if their colours agree too: pHash sees only brightness structure, so a product in red and the same
# product in teal hash alike. Colour distance is half the L1 distance of two soft 4x4x4 RGB histograms
# (0..1): JPEG re-encoded (q50+), halved and 5-10% cropped copies of products and photos measured <= 0.052,
# the same products recoloured (brand red -> coral, the closest pair tried) >= 0.103. Held both ways by
# tests/test_data_doctor.py::test_near_duplicates_see_colour.
NEAR_DUPLICATE_COLOUR = 0.075

Add = Callable[..., None]  # Report.add(severity, code, item, message, path=None)


def _gray(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: is each pixel brighter than its right neighbour, on a 9x8 thumbnail."""
    g = _gray(image, (9, 8))
    return _bits(g[:, 1:] > g[:, :-1])


_DCT = None


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: signs of the 8x8 lowest DCT frequencies of a 32x32 thumbnail vs their median."""
    global _DCT
    if _DCT is None:
        n = np.arange(32)
        _DCT = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64).astype(np.float32)
    coeffs = (_DCT @ _gray(image, (32, 32)) @ _DCT.T)[:8, :8].ravel()
    return _bits(coeffs > np.median(coeffs[1:]))


def _bits(mask: np.ndarray) -> int:
    return int("".join("1" if b else "0" for b in mask.ravel()), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def colour_histogram(image: Image.Image, bins: int = 4) -> tuple[float, ...]:
    """A bins^3 RGB histogram of a 64x64 thumbnail, summing to 1. Each channel value is shared linearly
    between its two nearest bin centres, so noise at a bin edge (JPEG, resampling) moves little mass."""
    rgb = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), np.float32).reshape(-1, 3)
    pos = np.clip(rgb / (256 / bins) - 0.5, 0, bins - 1)  # in bin-centre units
    low = np.minimum(pos.astype(np.int64), bins - 2)
    frac = pos - low
    hist = np.zeros((bins, bins, bins), np.float64)
    for corner in np.ndindex(2, 2, 2):
        idx = low + np.array(corner)
        weight = np.prod(np.where(np.array(corner), frac, 1 - frac), axis=1)
        np.add.at(hist, (idx[:, 0], idx[:, 1], idx[:, 2]), weight)
    return tuple((hist.ravel() / hist.sum()).round(5).tolist())


def colour_distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Share of the pixels whose colour bin would have to change to turn one histogram into the other (0..1)."""
    return 0.5 * float(np.abs(np.subtract(a, b)).sum())


def phase_correlation(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float, float]:
    """(dy, dx, peak, zero): the integer shift that best maps `a` onto `b`, the height of the correlation
    peak there and at zero shift (both in [0, 1]; a clean shift gives a peak far above everything else)."""
    h, w = a.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    fa = np.fft.fft2((a - a.mean()) * window)
    fb = np.fft.fft2((b - b.mean()) * window)
    cross = fb * np.conj(fa)
    # |r|: an edit that inverts contrast (dark product on light ground -> light on dark) peaks negative.
    r = np.abs(np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real)
    dy, dx = np.unravel_index(int(np.argmax(r)), r.shape)
    dy = dy - h if dy > h // 2 else dy
    dx = dx - w if dx > w // 2 else dx
    return int(dy), int(dx), float(r.max()), float(r[0, 0])


def edge_correlation(a: Image.Image, b: Image.Image) -> float:
    """Pearson correlation of the gradient magnitudes of two 64x64 thumbnails: ~0 for unrelated images."""
    ga, gb = (np.hypot(*np.gradient(_gray(im, (64, 64)))) for im in (a, b))
    ga, gb = ga - ga.mean(), gb - gb.mean()
    denom = float(np.sqrt((ga * ga).sum() * (gb * gb).sum()))
    return float((ga * gb).sum() / denom) if denom > 1e-6 else 0.0


def edit_features(image: Image.Image) -> tuple[float, ...]:
    """A few global statistics whose change from source to target describes an edit's direction."""
    small = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    gray = small.mean(-1)
    sat = small.max(-1) - small.min(-1)
    grad = np.hypot(*np.gradient(gray)).mean()
    return (*small.reshape(-1, 3).mean(0).tolist(), float(gray.std()), float(sat.mean()), float(grad))


def offset(source: Image.Image, target: Image.Image, max_side: int = 768) -> tuple[int, int] | None:
    """A small, clear translation between source and target, in target pixels; None when aligned or unclear."""
    tw, th = target.size
    scale = min(1.0, max_side / max(tw, th))
    size = (max(8, round(tw * scale)), max(8, round(th * scale)))
    a, b = _gray(source, size), _gray(target, size)
    dy, dx, peak, zero = phase_correlation(a, b)
    if (dy, dx) == (0, 0) or peak < 0.08 or peak < 2 * zero:
        return None
    if max(abs(dy) / size[1], abs(dx) / size[0]) > 0.1:  # a large jump is a different composition, not an offset
        return None
    return round(-dy / scale), round(-dx / scale)  # (dy, dx) maps source onto target; report where the source sits


def check_swapped_direction(deltas: list[tuple[str, np.ndarray]], add: Add, min_pairs: int = 4) -> None:
    """Flag pairs that change in the opposite direction to the rest of a consistent data set."""
    if len(deltas) < min_pairs:
        return
    vecs = np.stack([v for _, v in deltas])
    vecs = vecs / (vecs.std(0) + 1e-6)  # features on comparable scales
    total = vecs.sum(0)
    cos = []
    for v in vecs:
        rest = total - v
        cos.append(float(v @ rest / (np.linalg.norm(v) * np.linalg.norm(rest) + 1e-9)))
    cos = np.array(cos)
    if np.median(cos) < 0.5:  # the data set has no common direction; nothing to compare against
        return
    for (item_id, _), c in zip(deltas, cos):
        if c < -0.5:
            add(
                "warning",
                "swapped",
                item_id,
                f"this pair changes in the opposite direction to the other {len(deltas) - 1} (cosine {c:.2f}): source and target swapped?",
            )


def _age(image: dict) -> tuple:
    path = Path(image["path"])
    return (path.stat().st_mtime_ns if path.exists() else 0, path.name, image["id"])


def exclude_copies(images: list[dict], add: Add) -> list[dict]:
    """Exact copies (same `content`: the sha256s of an item's target and sources) are trained once: each later copy
    is an error naming the one kept, the earliest file. `images` as `check_duplicates` takes them (no `looks` needed:
    training screens with this alone). Returns the images kept."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for im in images:
        groups[im["content"]].append(im)
    # Of exact copies the earliest file stays (modification time, then name), whatever order the source lists them in.
    originals = {content: min(group, key=_age) for content, group in groups.items()}
    for im in images:
        original = originals[im["content"]]
        if original is im:
            continue
        merge = (
            ""
            if im["captions"] == original["captions"]
            else "; the captions differ: merge them into one item to keep both"
        )
        add(
            "error",
            "duplicate",
            im["id"],
            f"same image as {original['id']}, which is kept (the earlier file): trained "
            f"once, this copy is left out{merge}",
            im["path"],
        )
    return [im for im in images if originals[im["content"]] is im]


def check_duplicates(images: list[dict], add: Add) -> None:
    """`images`: one dict per clean item, in data order: id, path, content (the sha256s of the item's target and
    sources), captions, and `looks`: (phash, colour histogram) of the target then of each source. An exact copy
    of an item is excluded (`exclude_copies`). A near copy, one whose every image has a close pHash and
    close colours, is a warning: for an edit the pair is the example, so one target reached from two different
    sources is no duplicate. LSH on 8 bands of 8 bits of the target's pHash: any two hashes within 7 bits
    share at least one band, so only candidates are compared."""
    kept = exclude_copies(images, add)
    bands: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(kept):
        for band in range(8):
            bands[(band, (im["looks"][0][0] >> (8 * band)) & 0xFF)].append(i)
    compared = set()
    for members in bands.values():
        if len(members) < 2 or len(members) > 2000:  # a huge band is a flat-colour cluster; skip the O(n^2)
            continue
        for a_i in range(len(members)):
            for b_i in range(a_i + 1, len(members)):
                pair = (members[a_i], members[b_i])
                if pair in compared:
                    continue
                compared.add(pair)
                a, b = kept[pair[0]], kept[pair[1]]
                if len(a["looks"]) != len(b["looks"]):
                    continue
                dists = [(hamming(x[0], y[0]), colour_distance(x[1], y[1])) for x, y in zip(a["looks"], b["looks"])]
                if all(bits <= NEAR_DUPLICATE_BITS and colour <= NEAR_DUPLICATE_COLOUR for bits, colour in dists):
                    bits, colour = dists[0]
                    add(
                        "warning",
                        "near-duplicate",
                        b["id"],
                        f"looks like {a['id']} (pHash distance {bits}/64, colour distance {colour:.2f})",
                        b["path"],
                    )
