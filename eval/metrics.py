"""Image metrics for base-vs-adapter evaluation: pure functions on RGB images, no diffusion model involved.

Images are PIL images or uint8 arrays of shape (H, W, 3). Every function is deterministic for a given input
(k-means takes a seed), so two evaluation runs over the same images give the same numbers.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from scipy import ndimage, stats
from transformers import AutoModel, AutoProcessor

from qwen_image_lora.errors import InputError, NotFound

if TYPE_CHECKING:
    import torch

Picture = Image.Image | np.ndarray

# PSNR of identical images is infinite; capping keeps means and intervals finite. 100 dB is an MSE of
# 6.5e-6 on the 0..255 scale, far below one quantisation step, so no real difference is ever clipped.
PSNR_CAP_DB = 100.0


def to_rgb_array(image: Picture) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or an array (grey, RGB or RGBA; RGBA is composited on white)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"))


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{what}: images must have the same size, got {a.shape[1]}x{a.shape[0]} and {b.shape[1]}x{b.shape[0]}"
        )


# ----------------------------------------------------------------------------------------- palette fidelity


def hex_to_lab(colours: list[str]) -> np.ndarray:
    """CIELAB (D65) of hex colours like '#e30613'; returns (N, 3) float."""
    from skimage.color import rgb2lab  # noqa: PLC0415 - the eval extra

    rgb = []
    for c in colours:
        if not re.fullmatch(r"#?[0-9a-fA-F]{6}", c):
            raise InputError(f"palette colour {c!r}: expected a hex colour like '#e30613'", "eval.palette")
        c = c.lstrip("#")
        rgb.append([int(c[i : i + 2], 16) / 255.0 for i in (0, 2, 4)])
    return rgb2lab(np.array(rgb, dtype=np.float64)[None])[0]


def _kmeans(points: np.ndarray, k: int, seed: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding on (N, D) points; returns centres (k', D) and labels (N,).

    k' < k when the points hold fewer distinct values (a flat image has one cluster, not k copies of it).
    """
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(len(points))]]
    d2 = ((points - centres[0]) ** 2).sum(1)
    while len(centres) < k and d2.sum() > 1e-12:
        centres.append(points[rng.choice(len(points), p=d2 / d2.sum())])
        d2 = np.minimum(d2, ((points - centres[-1]) ** 2).sum(1))
    centres = np.array(centres)
    for _ in range(iters):
        labels = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        new = np.array(
            [points[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(len(centres))]
        )
        if np.allclose(new, centres):
            break
        centres = new
    labels = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    return centres, labels


def dominant_colours(image: Picture, k: int = 5, seed: int = 0, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The k dominant colours of an image by k-means in CIELAB.

    The image is downsampled to at most `side` px per edge first: dominant colours don't need every pixel and
    k-means on 1 MP would take seconds. Returns Lab centres (k', 3) and their pixel shares (k',), summing to 1,
    sorted by share (largest first).
    """
    from skimage.color import rgb2lab  # noqa: PLC0415 - the eval extra

    img = Image.fromarray(to_rgb_array(image))
    img.thumbnail((side, side), Image.Resampling.BOX)
    lab = rgb2lab(np.asarray(img, dtype=np.float64) / 255.0).reshape(-1, 3)
    centres, labels = _kmeans(lab, k, seed)
    shares = np.bincount(labels, minlength=len(centres)) / len(labels)
    keep = shares > 0
    order = np.argsort(-shares[keep], kind="stable")
    return centres[keep][order], shares[keep][order]


def palette_distance(image: Picture, palette: list[str], k: int = 5, seed: int = 0) -> float:
    """Share-weighted CIEDE2000 distance from each dominant colour to its nearest palette colour.

    0 = every dominant colour is a palette colour; ~2 is the just-noticeable difference; complementary hues
    score 50+. Lower is better.
    """
    if not palette:
        raise InputError("palette_distance: the palette is empty; set eval.palette to hex colours", "eval.palette")
    centres, shares = dominant_colours(image, k=k, seed=seed)
    return float((nearest_palette_distance(centres, hex_to_lab(palette)) * shares).sum())


def nearest_palette_distance(lab: np.ndarray, palette_lab: np.ndarray) -> np.ndarray:
    """CIEDE2000 from each CIELAB colour (N, 3) to its nearest palette colour (P, 3); returns (N,)."""
    from skimage.color import deltaE_ciede2000  # noqa: PLC0415 - the eval extra

    return deltaE_ciede2000(lab[:, None, :], palette_lab[None, :, :]).min(1)


# ----------------------------------------------------------------------------------------- edit preservation

_SSIM_WINDOW = 7  # skimage's default


def preservation(source: Picture, edited: Picture, mask: Picture | None = None) -> dict[str, float]:
    """SSIM and PSNR between source and edited image over the pixels the edit should not touch.

    mask: (H, W) bool or an image; True / non-zero marks the edited region, which is excluded. None = whole
    image. SSIM is the mean of skimage's SSIM map outside the mask; PSNR uses the MSE outside it, capped at
    PSNR_CAP_DB. Returns {"ssim": float in [-1, 1], "psnr": dB}.
    """
    from skimage.metrics import structural_similarity  # noqa: PLC0415 - the eval extra

    a, b = to_rgb_array(source), to_rgb_array(edited)
    _same_shape(a, b, "preservation")
    keep = np.ones(a.shape[:2], bool)
    if mask is not None:
        m = np.asarray(mask.convert("L")) > 127 if isinstance(mask, Image.Image) else np.asarray(mask).astype(bool)
        if m.ndim == 3:
            m = m.any(-1)
        if m.shape != keep.shape:
            raise ValueError(f"preservation: mask is {m.shape[1]}x{m.shape[0]}, images are {a.shape[1]}x{a.shape[0]}")
        keep = ~m
    if not keep.any():
        raise ValueError("preservation: the mask covers the whole image, nothing is left to compare")
    _, ssim_map = structural_similarity(a, b, channel_axis=2, data_range=255, win_size=_SSIM_WINDOW, full=True)
    # An SSIM value looks at a 7x7 window, so pixels within 3 px of the edit would be blamed for it.
    ssim_keep = ~ndimage.binary_dilation(~keep, structure=np.ones((_SSIM_WINDOW, _SSIM_WINDOW), bool))
    if not ssim_keep.any():
        ssim_keep = keep
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2)[keep].mean()
    psnr = PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))
    return {"ssim": float(ssim_map.mean(-1)[ssim_keep].mean()), "psnr": float(psnr)}


# ----------------------------------------------------------------------------------------- edit alignment


def _grey(image: Picture) -> np.ndarray:
    return to_rgb_array(image).astype(np.float64).mean(-1) / 255.0


def _zoom_about_centre(img: np.ndarray, scale: float) -> np.ndarray:
    """Magnify (H, W) `img` by `scale` about its centre, keeping the size."""
    from skimage.transform import AffineTransform, warp  # noqa: PLC0415 - the eval extra

    c = np.array([img.shape[1], img.shape[0]]) / 2 - 0.5
    t = AffineTransform(translation=-c) + AffineTransform(scale=scale) + AffineTransform(translation=c)
    return warp(img, t.inverse, order=1, mode="reflect")


def _log_polar_scale(a: np.ndarray, b: np.ndarray) -> float:
    """Scale of `b` relative to `a` from the log-polar transform of their magnitude spectra.

    The magnitude spectrum ignores translation, and a zoom by s shrinks it by 1/s, which log-polar coordinates
    turn into a shift along the radius axis that phase correlation measures.
    """
    from skimage.filters import difference_of_gaussians, window  # noqa: PLC0415 - the eval extra
    from skimage.registration import phase_cross_correlation  # noqa: PLC0415 - the eval extra
    from skimage.transform import warp_polar  # noqa: PLC0415 - the eval extra

    w = window("hann", a.shape)
    spectra = [np.abs(np.fft.fftshift(np.fft.fft2(difference_of_gaussians(x, 1, 20) * w))) for x in (a, b)]
    radius = min(a.shape) // 4
    n = 2 * radius
    # The spectrum of a real image is point-symmetric, so half the angles carry all the information.
    polar = [warp_polar(s, radius=radius, output_shape=(360, n), scaling="log", order=1)[:180] for s in spectra]
    shift, _, _ = phase_cross_correlation(polar[0], polar[1], upsample_factor=100, normalization=None)
    return float(math.exp(shift[1] * math.log(radius) / n))


def alignment(source: Picture, edited: Picture, refine_steps: int = 3) -> dict[str, float]:
    """How far the edited image moved and zoomed relative to the source (both the same size).

    Scale first (log-polar phase correlation, translation-invariant), then the shift after undoing it.
    The log-polar estimate is biased towards 1 by windowing, so it is repeated on the residual
    `refine_steps` times. Returns {"dx": px, "dy": px, "scale": ratio}: dx > 0 means the edited content sits
    further right, scale > 1 means it is magnified; dx/dy are in source pixels after undoing the scale. NaN (not
    scored) when either image is flat (one colour).
    """
    from skimage.filters import window  # noqa: PLC0415 - the eval extra
    from skimage.registration import phase_cross_correlation  # noqa: PLC0415 - the eval extra

    a, b = _grey(source), _grey(edited)
    _same_shape(a, b, "alignment")
    if min(a.std(), b.std()) < 1e-3:  # a flat image has no peak to find: a black output read as moved 1 px, grey 66
        return {"dx": math.nan, "dy": math.nan, "scale": math.nan}
    scale, residual = 1.0, b
    for _ in range(1 + refine_steps):
        scale *= _log_polar_scale(a, residual)
        residual = _zoom_about_centre(b, 1.0 / scale)
    # A window stops the image borders (which don't wrap around) from dominating the correlation peak.
    w = window("hann", a.shape)
    shift, _, _ = phase_cross_correlation(a * w, residual * w, upsample_factor=20)
    # `+ 0.0` turns -0.0 into 0.0 so the report never shows "-0.0 px".
    return {"dx": float(-shift[1]) + 0.0, "dy": float(-shift[0]) + 0.0, "scale": scale}


# ----------------------------------------------------------------------------------------- in-image text

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def quoted_text(prompt: str) -> list[str]:
    """Strings the prompt asks to render: the contents of "..." and “...” in order of appearance."""
    return [m.group(1) or m.group(2) for m in _QUOTED.finditer(prompt)]


@functools.lru_cache(maxsize=1)
def _ocr_engine():
    # rapidocr_onnxruntime ships its ONNX weights inside the wheel, so this never touches the network.
    from rapidocr_onnxruntime import RapidOCR  # noqa: PLC0415 - the eval extra

    return RapidOCR()


def read_text(image: Picture) -> str:
    """OCR the image; the detected lines joined by spaces in reading order (top to bottom, left to right)."""
    result, _ = _ocr_engine()(to_rgb_array(image))
    if not result:
        return ""
    # Sort on the box's top-left corner, grouping lines by half a text height so a slightly lower word on the
    # same line still reads left to right.
    heights = [abs(box[3][1] - box[0][1]) for box, _, _ in result]
    band = max(1.0, float(np.median(heights)) / 2)
    ordered = sorted(result, key=lambda r: (round(r[0][0][1] / band), r[0][0][0]))
    return " ".join(text for _, text, _ in ordered)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _squash(text: str) -> str:
    # Case and spacing are dropped: the OCR model often merges words ("SUMMERSALE"), which is a reading
    # artefact, not a rendering error.
    return re.sub(r"\s+", "", text).casefold()


def text_accuracy(expected: str, read: str) -> dict[str, float]:
    """Score OCR output against the text the prompt asked for.

    cer: edit distance / expected length on case- and space-insensitive text, capped at 1 (blank = 1, so means
    stay in [0, 1]); word_accuracy: share of expected words found in the read text, in order, no two sharing a
    read letter (`_words_found`); exact: 1.0 if the whole text matches.
    """
    want, got = _squash(expected), _squash(read)
    if not want:
        raise ValueError("text_accuracy: the expected text is empty")
    words = [_squash(w) for w in re.findall(r"\w+", expected)]
    return {
        "cer": min(1.0, edit_distance(want, got) / len(want)),
        "word_accuracy": _words_found(words, got) / len(words) if words else float(want == got),
        "exact": float(want == got),
    }


def _words_found(words: list[str], text: str) -> int:
    """The most of `words` found in `text` in their order, each read letter used once. A word may sit inside a longer
    run (the OCR merges words: "SUMMERSALE"); it was also found inside another word's letters ("A NEW DAY" read as
    "DAY" scored 2 of 3: its "A" was DAY's)."""

    @functools.cache
    def most(i: int, start: int) -> int:
        if i == len(words):
            return 0
        at = text.find(words[i], start)  # the earliest match leaves the most text to the words after it
        return max(most(i + 1, start), 1 + most(i + 1, at + len(words[i])) if at >= 0 else 0)

    return most(0, 0)


def prompt_text_accuracy(image: Picture, prompt: str) -> dict[str, float] | None:
    """text_accuracy of the image against the prompt's quoted text; None when the prompt quotes nothing."""
    wanted = quoted_text(prompt)
    if not wanted:
        return None
    return text_accuracy(" ".join(wanted), read_text(image))


# ----------------------------------------------------------------------------------------- CLIP / SigLIP


class ClipScorer:
    """CLIPScore and image-image similarity from local CLIP or SigLIP weights (a transformers folder).

    Loading is local-only: evaluation must not download weights behind the user's back.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):

        path = Path(path)
        if not (path / "config.json").is_file():
            raise NotFound(
                f"eval.clip_model: {path} is not a transformers model folder (no config.json)", "eval.clip_model"
            )
        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(self.device)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @staticmethod
    def _unit(features) -> torch.Tensor:
        # transformers 5 returns a model output with the projected embedding as pooler_output; 4.x a tensor.
        features = getattr(features, "pooler_output", features)
        return features / features.norm(dim=-1, keepdim=True)

    def embed_images(self, images: list[Picture]) -> torch.Tensor:
        """Unit-norm image embeddings, (N, D) float32."""

        pixels = self.processor(images=[Image.fromarray(to_rgb_array(i)) for i in images], return_tensors="pt")
        with torch.inference_mode():
            return self._unit(
                self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
            ).float()

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings, (N, D) float32."""

        # SigLIP was trained on max_length padding; CLIP's causal mask makes the padding harmless for it.
        tokens = self.processor(
            text=texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            return self._unit(self.model.get_text_features(**tokens)).float()

    def clip_score(self, images: list[Picture], texts: list[str]) -> list[float]:
        """CLIPScore per (image, text) pair: 100 * max(cos, 0), as in torchmetrics."""
        sims = (self.embed_images(images) * self.embed_texts(texts)).sum(-1)
        return [100.0 * max(float(s), 0.0) for s in sims]

    def image_similarity(self, images: list[Picture], references: list[Picture]) -> list[float]:
        """Cosine similarity per (image, reference) pair, in [-1, 1]; identical images give 1."""
        return [float(s) for s in (self.embed_images(images) * self.embed_images(references)).sum(-1)]


# ----------------------------------------------------------------------------------------- uncertainty


@dataclass(frozen=True)
class Interval:
    """A mean with its Student-t confidence interval; n = the number of finite values used. `all_equal`: every value
    was the same, and there is no interval (NaN bounds): a sample without spread says nothing about the spread of
    what it was drawn from (eight word-accuracy differences of 1 were shown as an exact [1, 1])."""

    mean: float
    low: float
    high: float
    n: int
    all_equal: bool = False


def mean_ci(values, confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of `values` (1-D); NaN and inf (unscored items) are dropped. Its coverage holds
    at small n (exact for normal values), where a percentile bootstrap's does not: at n = 4 that covers about 80% for
    a stated 95%. One value, or values all equal, have no interval (NaN bounds)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, math.nan, math.nan, 1)
    # Equal up to rounding: 0.4 - 0.2 and 0.6 - 0.4 differ in the last bit, and a sem of 1e-17 stated "CI -0.2..-0.2"
    # where the sign test decides (one letter better in every pair of 6 read as better, or not, by the step's bits).
    if np.ptp(x) <= 1e-12 * max(1.0, float(np.abs(x).max())):
        return Interval(mean, math.nan, math.nan, len(x), all_equal=True)
    sem = float(stats.sem(x))
    low, high = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), len(x))


def paired_difference_ci(a, b, confidence: float = 0.95) -> Interval:
    """Interval of mean(a - b) over paired items (same prompt and seed): the per-item differences carry the
    pairing, which makes the interval much tighter than comparing two separate intervals."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference_ci: {len(a)} and {len(b)} values are not paired")
    return mean_ci(a - b, confidence)
