"""`qwen-lora data doctor`: read every item once and say what is wrong with the data, before any training.

    report = diagnose(cfg)             # a `Report`: findings, excluded item ids, bucket histogram
    print(report.table()); report.write_json(path); report.write_html(path)

Never touches the user's files: items with an error are *excluded* (listed in the report, skipped by
`prepare` and by training, which read `<cache_dir>/doctor.json`); warnings are kept. What is checked:

    per image   empty-file, unreadable, truncated (a cut JPEG/PNG), huge (over data.max_megapixels),
                extension-mismatch (a PNG named .jpg that decodes: warning), too-small (a side under
                data.min_side), extreme-aspect (over data.max_aspect), low-resolution (trains well under
                the pixel budget because of data.max_upscale: warning)
    captions    missing-caption (none, or only blank lines), caption-too-long (over data.max_caption_tokens
                tokens with the model's own tokenizer; only the tokenizer is loaded), missing-trigger
    duplicates  duplicate (same bytes), near-duplicate (perceptual hash within NEAR_DUPLICATE_BITS of 64)
    edit pairs  source-equals-target (error), size-mismatch, unrelated-pair (no shared structure),
                misaligned (phase correlation finds the source offset by a few pixels from the target),
                swapped (file names say so, or the pair changes in the opposite direction to the rest)

Perceptual hashes (dHash, pHash) and phase correlation are small numpy functions below.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_image_lora.config import Config
from qwen_image_lora.data.buckets import assign_bucket, histogram
from qwen_image_lora.data.sources import Item, format_caption, load_items
from qwen_image_lora.io import atomic_write_text

NEAR_DUPLICATE_BITS = 6  # pHash Hamming distance (of 64) under which two images count as near duplicates
EXPECTED_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
SOURCE_WORDS = {"source", "src", "before", "input", "in", "orig", "original", "ref", "reference"}
TARGET_WORDS = {"target", "tgt", "after", "output", "out", "result", "edited", "edit"}


@dataclass
class Finding:
    severity: str  # "error" (item excluded) or "warning" (kept)
    code: str
    item: str  # item id ("" for data-set level findings)
    message: str
    path: str | None = None


@dataclass
class ImageInfo:
    """What the doctor keeps per image file: a few bytes, never the pixels."""

    path: str
    size: tuple[int, int] = (0, 0)  # after EXIF orientation
    format: str | None = None
    sha256: str = ""
    phash: int = 0
    dhash: int = 0
    features: tuple[float, ...] = ()  # for the edit-direction (swap) check
    error: tuple[str, str] | None = None  # (code, message)
    warnings: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Report:
    data_path: str
    n_items: int
    findings: list[Finding] = field(default_factory=list)
    excluded: dict[str, list[str]] = field(default_factory=dict)  # item id -> error codes
    buckets: Counter = field(default_factory=Counter)  # (w, h) of clean targets -> count
    pairs: list[dict] = field(default_factory=list)  # edit rows for the contact sheet (thumbnails inline)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def n_clean(self) -> int:
        return self.n_items - len(self.excluded)

    def codes(self) -> Counter:
        return Counter(f.code for f in self.findings)

    def to_dict(self) -> dict:
        return {
            "data_path": self.data_path,
            "summary": {
                "items": self.n_items,
                "clean": self.n_clean,
                "excluded": len(self.excluded),
                "errors": len(self.errors),
                "warnings": len(self.warnings),
                "by_code": dict(self.codes()),
            },
            "excluded": self.excluded,
            "findings": [asdict(f) for f in self.findings],
            "buckets": [{"size": list(b), "count": n} for b, n in self.buckets.most_common()],
        }

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def table(self, limit: int = 60) -> str:
        """The findings as a fixed-width table (errors first), the summary and the bucket histogram."""
        rows = sorted(self.findings, key=lambda f: (f.severity != "error", f.code, f.item))
        lines = []
        if rows:
            w_item = min(40, max(4, *(len(f.item) for f in rows)))
            w_code = max(4, *(len(f.code) for f in rows))
            lines.append(f"{'severity':<8}  {'code':<{w_code}}  {'item':<{w_item}}  message")
            lines.append("-" * (8 + w_code + w_item + 40))
            for f in rows[:limit]:
                item = f.item if len(f.item) <= w_item else "..." + f.item[-(w_item - 3) :]
                lines.append(f"{f.severity:<8}  {f.code:<{w_code}}  {item:<{w_item}}  {f.message}")
            if len(rows) > limit:
                lines.append(f"... {len(rows) - limit} more findings in the JSON report")
        else:
            lines.append("no problems found")
        codes = ", ".join(f"{c} {n}" for c, n in self.codes().most_common())
        lines.append(
            f"\n{self.n_items} items: {self.n_clean} clean, {len(self.excluded)} excluded; "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings{' (' + codes + ')' if codes else ''}"
        )
        if self.buckets:
            lines.append(f"buckets (clean targets):\n{histogram(list(self.buckets.elements()))}")
        return "\n".join(lines)

    def write_html(self, path: str | Path) -> None:
        """A contact sheet of the edit pairs: sources | target | instruction, flagged rows marked."""
        rows = []
        for p in self.pairs:
            flags = p["flags"]
            cls = "error" if p["excluded"] else ("flag" if flags else "")
            srcs = "".join(f'<img src="{s}">' for s in p["sources"])
            tgt = f'<img src="{p["target"]}">' if p["target"] else "(unreadable)"
            note = "<br>".join(html.escape(f) for f in flags)
            rows.append(
                f'<tr class="{cls}"><td>{html.escape(p["id"])}</td><td>{srcs}</td><td>{tgt}</td>'
                f'<td>{html.escape(p["instruction"])}</td><td>{note}</td></tr>'
            )
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>data doctor: edit pairs</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:4px;vertical-align:top}}
img{{max-width:160px;max-height:160px;margin:2px}} tr.flag{{background:#fff3cd}} tr.error{{background:#f8d7da}}</style></head>
<body><h1>Edit pairs ({len(self.pairs)}; {sum(1 for p in self.pairs if p["flags"])} flagged)</h1>
<p>{html.escape(self.data_path)}. Yellow: warnings; red: excluded.</p>
<table><tr><th>item</th><th>sources</th><th>target</th><th>instruction</th><th>flags</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
        atomic_write_text(path, page)


# ------------------------------------------------------------------------------------------ image maths


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


def _features(image: Image.Image) -> tuple[float, ...]:
    """A few global statistics whose change from source to target describes an edit's direction."""
    small = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    gray = small.mean(-1)
    sat = small.max(-1) - small.min(-1)
    grad = np.hypot(*np.gradient(gray)).mean()
    return (*small.reshape(-1, 3).mean(0).tolist(), float(gray.std()), float(sat.mean()), float(grad))


def _thumbnail(image: Image.Image, side: int = 160) -> str:
    im = image.copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    if im.mode == "RGBA":
        im.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    im.convert("RGB").save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------ per image


def probe_image(path: Path, cfg: Config) -> tuple[ImageInfo, Image.Image | None]:
    """Decode one file completely; return what the checks need and the image (RGB or RGBA), or None."""
    import hashlib

    d = cfg.data
    info = ImageInfo(str(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        info.error = ("missing-file", "file not found")
        return info, None
    except OSError as e:
        info.error = ("unreadable", f"cannot read the file: {e}")
        return info, None
    if not data:
        info.error = ("empty-file", "the file is empty (0 bytes)")
        return info, None
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            info.format = im.format
            w, h = im.size
            if w * h > d.max_megapixels * 1e6:
                info.error = ("huge", f"{w}x{h} is {w * h / 1e6:.0f} MP, over data.max_megapixels={d.max_megapixels:g}")
                return info, None
            im.load()
            image = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        info.error = ("unreadable", "not an image Pillow can decode")
        return info, None
    except Image.DecompressionBombError as e:
        info.error = ("huge", str(e))
        return info, None
    except (OSError, SyntaxError, ValueError) as e:
        code = "truncated" if "truncat" in str(e).lower() or "broken data stream" in str(e).lower() else "corrupt"
        info.error = (code, f"decoding failed: {e}")
        return info, None
    expected = EXPECTED_FORMATS.get(path.suffix.lower())
    if expected and info.format != expected:
        info.warnings.append(("extension-mismatch", f"a {info.format} file named {path.suffix}; it decodes, so it is kept"))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    image = image.convert("RGBA") if has_alpha else image.convert("RGB")
    if has_alpha and d.alpha == "composite":
        flat = Image.new("RGB", image.size, d.background)
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    info.size = image.size
    w, h = image.size
    if min(w, h) < d.min_side:
        info.error = ("too-small", f"{w}x{h}: a side is under data.min_side={d.min_side}")
    elif max(w, h) / min(w, h) > d.max_aspect:
        info.error = ("extreme-aspect", f"{w}x{h} (aspect {max(w, h) / min(w, h):.1f}:1) is over data.max_aspect={d.max_aspect:g}")
    else:
        bw, bh = assign_bucket(w, h, d.resolution, d.max_upscale)
        if bw * bh < 0.5 * d.resolution**2:
            info.warnings.append(
                ("low-resolution", f"{w}x{h} trains at {bw}x{bh}, under half the {d.resolution}px budget (data.max_upscale={d.max_upscale:g})")
            )
    info.phash, info.dhash, info.features = phash(image), dhash(image), _features(image)
    return info, image


# ------------------------------------------------------------------------------------------ the doctor


def load_tokenizer(cfg: Config):
    """The model's own tokenizer (processor/ subfolder), without any weights; None when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model.pretrained, subfolder="processor", revision=cfg.model.revision)
    except Exception:  # noqa: BLE001 - offline, gated, or a layout without processor/: report and go on
        return None


def diagnose(cfg: Config, items: list[Item] | None = None, tokenizer="auto", contact_sheet: bool = True) -> Report:
    """Check every item of `cfg.data` (or the given items). Reads each image once; keeps only hashes."""
    d = cfg.data
    items = load_items(d) if items is None else items
    report = Report(str(d.path), len(items))
    if tokenizer == "auto":
        tokenizer = load_tokenizer(cfg)
        if tokenizer is None:
            report.findings.append(
                Finding("warning", "tokenizer-unavailable", "", f"could not load the tokenizer of {cfg.model.pretrained}; caption lengths not checked")
            )
    infos: dict[str, ImageInfo] = {}  # by path: a reference image shared by many edits is read once
    pair_deltas: list[tuple[str, np.ndarray]] = []

    def add(severity, code, item, message, path=None):
        report.findings.append(Finding(severity, code, item, message, str(path) if path else None))
        if severity == "error":
            report.excluded.setdefault(item, [])
            if code not in report.excluded[item]:
                report.excluded[item].append(code)

    def probe(item: Item, path: Path, role: str) -> tuple[ImageInfo, Image.Image | None]:
        cached = infos.get(str(path))
        need_pixels = bool(item.sources) or cached is None
        if cached is not None and not need_pixels:
            info, image = cached, None
        else:
            info, image = probe_image(path, cfg)
            if cached is None:
                infos[str(path)] = info
        if info.error:
            add("error", info.error[0], item.id, f"{role} {path.name}: {info.error[1]}", path)
        for code, message in info.warnings:
            add("warning", code, item.id, f"{role} {path.name}: {message}", path)
        return info, image

    for item in items:
        tinfo, timage = probe(item, item.target, "target" if item.sources else "image")
        sources = [probe(item, p, f"source {i + 1}") for i, p in enumerate(item.sources)]
        _check_captions(item, cfg, tokenizer, add)
        if item.sources:
            flags = _check_pair(item, tinfo, timage, sources, add)
            if tinfo.features and sources and sources[0][0].features and not flags.get("identical"):
                pair_deltas.append((item.id, np.subtract(tinfo.features, sources[0][0].features)))
            if contact_sheet:
                report.pairs.append(
                    {
                        "id": item.id,
                        "instruction": item.captions[0] if item.captions else "",
                        "target": _thumbnail(timage) if timage is not None else "",
                        "sources": [_thumbnail(im) for _, im in sources if im is not None],
                    }
                )
        if not tinfo.error and item.id not in report.excluded:
            report.buckets[assign_bucket(*tinfo.size, d.resolution, d.max_upscale)] += 1

    _check_swapped_direction(pair_deltas, add)
    _check_duplicates(items, infos, add)
    # Items excluded later (duplicates never are) may still be counted in buckets: recount.
    report.buckets = Counter(
        assign_bucket(*infos[str(it.target)].size, d.resolution, d.max_upscale)
        for it in items
        if it.id not in report.excluded and not infos[str(it.target)].error
    )
    by_item = defaultdict(list)
    for f in report.findings:
        by_item[f.item].append(f"{f.severity}: {f.code}: {f.message}")
    for p in report.pairs:
        p["flags"] = by_item.get(p["id"], [])
        p["excluded"] = p["id"] in report.excluded
    return report


def _check_captions(item: Item, cfg: Config, tokenizer, add) -> None:
    d = cfg.data
    what = "instruction" if item.sources else "caption"
    if not item.captions:
        hint = "an 'instruction'" if item.sources else f"a {item.target.with_suffix('.txt').name} (or 'caption' in the manifest)"
        add("error", f"missing-{what}", item.id, f"no {what} (or only blank ones); add {hint}")
        return
    for text in item.captions:
        full = format_caption(text, d)
        if tokenizer is not None:
            n = len(tokenizer(full, add_special_tokens=False)["input_ids"])
            if n > d.max_caption_tokens:
                add("error", f"{what}-too-long", item.id, f"{n} tokens, over data.max_caption_tokens={d.max_caption_tokens}: {full[:60]!r}...")
        if d.trigger_word and not re.search(rf"(?<!\w){re.escape(d.trigger_word)}(?!\w)", full, re.IGNORECASE):
            add("warning", "missing-trigger", item.id, f"{what} {full[:60]!r} lacks the trigger word {d.trigger_word!r} (add it, or put {{trigger}} in data.caption_template)")


def _check_pair(item: Item, tinfo: ImageInfo, timage, sources, add) -> dict:
    flags = {}
    if _name_says_swapped(item):
        add("warning", "swapped", item.id, f"file names suggest source and target are swapped ({item.sources[0].name} -> {item.target.name})")
    for i, (sinfo, simage) in enumerate(sources):
        role = f"source {i + 1}"
        if tinfo.error or sinfo.error or timage is None or simage is None:
            continue
        if sinfo.sha256 == tinfo.sha256 or (
            sinfo.size == tinfo.size and np.abs(np.asarray(simage, np.int16) - np.asarray(timage, np.int16)).mean() < 0.5
            if simage.mode == timage.mode
            else False
        ):
            add("error", "source-equals-target", item.id, f"{role} is the same image as the target: nothing to learn")
            flags["identical"] = True
            continue
        if sinfo.size != tinfo.size:
            add("warning", "size-mismatch", item.id, f"{role} is {sinfo.size[0]}x{sinfo.size[1]}, the target {tinfo.size[0]}x{tinfo.size[1]}: pixels are not aligned")
        corr = edge_correlation(simage, timage)
        dist = hamming(sinfo.phash, tinfo.phash)
        if corr < 0.15 and dist > 20:
            add("warning", "unrelated-pair", item.id, f"{role} and the target share no structure (edge correlation {corr:.2f}, pHash distance {dist}/64)")
            continue
        # Offsets only mean something when the two images frame the same scene at the same aspect.
        sw, sh = sinfo.size
        tw, th = tinfo.size
        if abs(sw / sh - tw / th) < 0.01:
            shift = _offset(simage, timage)
            if shift is not None:
                dy, dx = shift
                add("warning", "misaligned", item.id, f"{role} is offset from the target by ({dx:+d}, {dy:+d}) px (x, y): the adapter would learn to shift images")
    return flags


def _offset(source: Image.Image, target: Image.Image, max_side: int = 768) -> tuple[int, int] | None:
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


def _name_says_swapped(item: Item) -> bool:
    words = lambda p: set(re.split(r"[^a-z]+", p.stem.lower()))  # noqa: E731
    return bool(words(item.target) & SOURCE_WORDS and not words(item.target) & TARGET_WORDS) and any(
        words(s) & TARGET_WORDS and not words(s) & SOURCE_WORDS for s in item.sources
    )


def _check_swapped_direction(deltas: list[tuple[str, np.ndarray]], add, min_pairs: int = 4) -> None:
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
            add("warning", "swapped", item_id, f"this pair changes in the opposite direction to the other {len(deltas) - 1} (cosine {c:.2f}): source and target swapped?")


def _check_duplicates(items: list[Item], infos: dict[str, ImageInfo], add) -> None:
    """Exact (same bytes) and near (pHash) duplicates among the targets. LSH on 8 bands of 8 bits: any two
    hashes within 7 bits share at least one band, so only candidates are compared."""
    seen_sha: dict[str, str] = {}
    first_of: dict[str, str] = {}
    hashes: list[tuple[str, int]] = []
    for item in items:
        info = infos.get(str(item.target))
        if info is None or info.error:
            continue
        if info.sha256 in seen_sha:
            add("warning", "duplicate", item.id, f"same file content as {seen_sha[info.sha256]}", item.target)
            first_of[item.id] = seen_sha[info.sha256]
            continue
        seen_sha[info.sha256] = item.id
        hashes.append((item.id, info.phash))
    bands: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (_, h) in enumerate(hashes):
        for band in range(8):
            bands[(band, (h >> (8 * band)) & 0xFF)].append(i)
    reported = set()
    for members in bands.values():
        if len(members) < 2 or len(members) > 2000:  # a huge band is a flat-colour cluster; skip the O(n^2)
            continue
        for a_i in range(len(members)):
            for b_i in range(a_i + 1, len(members)):
                a, b = members[a_i], members[b_i]
                if (a, b) in reported:
                    continue
                dist = hamming(hashes[a][1], hashes[b][1])
                if dist <= NEAR_DUPLICATE_BITS:
                    reported.add((a, b))
                    add("warning", "near-duplicate", hashes[b][0], f"looks like {hashes[a][0]} (pHash distance {dist}/64)")


def excluded_ids(cache_dir: str | Path | None, data_path: str | None) -> dict[str, list[str]]:
    """Items to leave out of training: those the last doctor run over `data_path` excluded
    (`<cache_dir>/doctor.json`) and those `prepare` failed to encode (`<cache_dir>/prepare-r*.json`)."""
    if not cache_dir or not Path(cache_dir).is_dir():
        return {}
    out: dict[str, list[str]] = {}
    for path in [Path(cache_dir) / "doctor.json", *sorted(Path(cache_dir).glob("prepare-r*.json"))]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("data_path") == str(data_path):
            for item_id, codes in data.get("excluded", {}).items():
                out.setdefault(item_id, []).extend(codes)
    return out
