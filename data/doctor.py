"""`qwen-lora data doctor`: read every item once and say what is wrong with the data, before any training.

    report = diagnose(cfg)             # a `report.Report`: findings, excluded item ids, bucket histogram
    print(report.table()); report.write_json(path); report.write_html(path)

Never touches the user's files: items with an error are *excluded* (listed in the report, skipped by
`prepare` and by training, which read `verdicts_dir(cfg)/doctor.json`); warnings are kept. Training screens the items
the doctor has not judged as they are now with these per-item checks (`check_item`) and the exact-copy check
(`screening.py`).
What is checked:

    listing     symlink-loop, missing-file (a dangling link), caption-not-utf8, unreadable-caption
    per image   empty-file, unreadable, truncated (a cut JPEG/PNG), huge (over data.max_megapixels, or a
                decompression bomb), extension-mismatch (a PNG named .jpg, a GIF named .png, that decodes: warning
                naming what it is; training warns too), too-small
                (a side under data.min_side), extreme-aspect (over data.max_aspect), low-resolution (trains
                well under the pixel budget because of data.max_upscale: warning)
    captions    missing-caption (none, or only blank lines), caption-too-long (over data.max_caption_tokens
                tokens with the model's own tokenizer; only the tokenizer is loaded), missing-trigger,
                placeholder-in-caption (a literal {trigger} in a caption file: warning)
    duplicates  duplicate (same bytes: the copy is excluded, so it trains once), near-duplicate (pHash and
                colour both close: warning), shared-caption (photo.jpg and photo.png both caption from photo.txt:
                warning)
    edit pairs  source-equals-target (error), size-mismatch, unrelated-pair (no shared structure),
                misaligned (phase correlation finds the source offset by a few pixels from the target),
                swapped (file names say so, or the pair changes in the opposite direction to the rest)

The image maths lives in `similarity.py`, the report and its formats in `report.py`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoTokenizer

from qwen_image_lora.config import Config
from qwen_image_lora.data import similarity as sim
from qwen_image_lora.data.buckets import assign_bucket
from qwen_image_lora.data.report import Report, thumbnail
from qwen_image_lora.data.sources import Item, format_caption, load_items
from qwen_image_lora.hub import check_pretrained
from qwen_image_lora.images import INPUT_FORMATS, ImageInputError, read_with_header
from qwen_image_lora.presets import same_aspect

logger = logging.getLogger(__name__)

EXPECTED_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
SOURCE_WORDS = {"source", "src", "before", "input", "in", "orig", "original", "ref", "reference"}
TARGET_WORDS = {"target", "tgt", "after", "output", "out", "result", "edited", "edit"}


@dataclass
class ImageInfo:
    """What the doctor keeps per image file: a few bytes, never the pixels."""

    path: str
    size: tuple[int, int] = (0, 0)  # after EXIF orientation
    format: str | None = None
    sha256: str = ""
    phash: int = 0
    dhash: int = 0
    colour: tuple[float, ...] = ()  # `similarity.colour_histogram`
    features: tuple[float, ...] = ()  # for the edit-direction (swap) check
    error: tuple[str, str] | None = None  # (code, message)
    warnings: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ per image


def probe_image(path: Path, cfg: Config) -> tuple[ImageInfo, Image.Image | None]:
    """Decode one file completely; return what the checks need and the image (RGB or RGBA), or None."""
    d = cfg.data
    info = ImageInfo(str(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        info.error = ("missing-file", f"{path} does not exist (a manifest's paths are relative to its folder)")
        return info, None
    except OSError as e:
        loop = e.errno == errno.ELOOP
        info.error = (
            ("symlink-loop", "a symbolic link that leads back to itself")
            if loop
            else ("unreadable", f"cannot read the file: {e}")
        )
        return info, None
    if not data:
        info.error = ("empty-file", "the file is empty (0 bytes)")
        return info, None
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:  # as training reads it (`sources.open_image`): the one reader
        header, image = read_with_header(data, max_pixels=int(d.max_megapixels * 1e6), formats=None)
    except ImageInputError as e:
        limit = f" (data.max_megapixels={d.max_megapixels:g})" if e.code == "huge" else ""
        info.error = (e.code, f"{e}{limit}")
        return info, None
    info.format = header.format
    expected = EXPECTED_FORMATS.get(path.suffix.lower())
    if expected and info.format != expected:
        what = f"a {info.format} file named {path.suffix}"
        if info.format not in INPUT_FORMATS:  # a GIF named .png: say what training will see of it
            frames = f"; {header.frames} frames, only the first trains" if header.frames > 1 else ""
            what += f" (not JPEG, PNG or WebP{frames})"
        info.warnings.append(("extension-mismatch", f"{what}; it decodes, so it is kept"))
    if image.mode == "RGBA" and d.alpha == "composite":
        flat = Image.new("RGB", image.size, d.background)
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    info.size = image.size
    w, h = image.size
    if min(w, h) < d.min_side:
        info.error = ("too-small", f"{w}x{h}: a side is under data.min_side={d.min_side}")
    elif max(w, h) / min(w, h) > d.max_aspect:
        info.error = (
            "extreme-aspect",
            f"{w}x{h} (aspect {max(w, h) / min(w, h):.1f}:1) is over data.max_aspect={d.max_aspect:g}",
        )
    else:
        bw, bh = assign_bucket(w, h, d.resolution, d.max_upscale)
        if bw * bh < 0.5 * d.resolution**2:
            info.warnings.append(
                (
                    "low-resolution",
                    f"{w}x{h} trains at {bw}x{bh}, under half the {d.resolution}px budget (data.max_upscale={d.max_upscale:g})",
                )
            )
    info.phash, info.dhash = sim.phash(image), sim.dhash(image)
    info.colour, info.features = sim.colour_histogram(image), sim.edit_features(image)
    return info, image


# ------------------------------------------------------------------------------------------ per item


def fingerprint(item: Item) -> str:
    """What an item's verdict depends on: its captions and the size and time of each of its files, so a file
    changed after the doctor ran is checked again."""
    parts = [repr((item.captions, item.issues))]
    for path in (item.target, *item.sources, *([item.mask] if item.mask else [])):
        try:
            st = path.stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        except (OSError, RuntimeError):
            parts.append(f"{path}:unreadable")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def check_item(item: Item, cfg: Config, tokenizer, report: Report, infos: dict[str, ImageInfo] | None = None):
    """The per-item checks (problems found while listing, every image, the captions), added to `report`.
    Returns (target info, target image, [(source info, source image)]) for the checks across items. `infos`
    shares the probes of files used by several items (a reference image shared by many edits is read once)."""
    infos = {} if infos is None else infos
    report.judged[item.id] = fingerprint(item)
    for code, message in item.issues:
        report.add("error", code, item.id, message, item.target)

    def probe(path: Path, role: str) -> tuple[ImageInfo, Image.Image | None]:
        cached = infos.get(str(path))
        if cached is not None and not item.sources:
            info, image = cached, None
        else:
            info, image = probe_image(path, cfg)
            infos.setdefault(str(path), info)
        if info.error:
            report.add("error", info.error[0], item.id, f"{role} {path.name}: {info.error[1]}", path)
        for code, message in info.warnings:
            report.add("warning", code, item.id, f"{role} {path.name}: {message}", path)
        return info, image

    if any(code == "symlink-loop" or code == "missing-file" for code, _ in item.issues):
        return ImageInfo(str(item.target), error=item.issues[0]), None, []
    target = probe(item.target, "target" if item.sources else "image")
    sources = [probe(p, f"source {i + 1}") for i, p in enumerate(item.sources)]
    if item.mask is not None:
        mask_info, _ = probe(item.mask, "mask")
        if (
            not mask_info.error
            and target[0].size
            and mask_info.size
            and not same_aspect(mask_info.size, target[0].size)
        ):
            report.add(
                "error",
                "mask-size",
                item.id,
                f"mask {item.mask.name} is {mask_info.size[0]}x{mask_info.size[1]}, "
                f"the target {target[0].size[0]}x{target[0].size[1]}: export the mask at the target's size",
                item.mask,
            )
    if not any(code.startswith(("caption-", "unreadable-caption")) for code, _ in item.issues):
        _check_captions(item, cfg, tokenizer, report)
    return target[0], target[1], sources


def _near_caption_file(image: Path) -> str | None:
    """A .txt beside `image` meant as its caption but not read: a name that differs in case (`bottle.txt` for
    `Bottle.png`, an export from a case-blind disk) or keeps the image's extension (`mug.png.txt`)."""
    wanted = image.with_suffix(".txt").name
    names = _txt_names(image.parent, image.parent.stat().st_mtime_ns)  # a rename since changes the folder's mtime
    near = names.get(wanted.lower()) or names.get(f"{image.name}.txt".lower())
    return near if near != wanted else None


@functools.lru_cache(maxsize=64)
def _txt_names(folder: Path, mtime_ns: int) -> dict[str, str]:
    """The .txt files of `folder` by lower-case name: listed once, not once per image without a caption."""
    return {p.name.lower(): p.name for p in folder.glob("*.txt")}


def _check_captions(item: Item, cfg: Config, tokenizer, report: Report) -> None:
    d = cfg.data
    what = "instruction" if item.sources else "caption"
    if not item.captions:
        if item.caption_file is not None and item.caption_file.is_file():
            blank = "is empty" if item.caption_file.stat().st_size == 0 else "holds only blank lines"
            hint = f"{item.caption_file.name} {blank}: write the caption in it"
        elif item.sources:
            hint = "add an 'instruction'"
        elif near := _near_caption_file(item.target):
            hint = f"{near} beside it is not its caption file: rename it {item.target.with_suffix('.txt').name}"
        elif item.split_key is not None:  # a manifest's row: a .txt beside its image is not read
            hint = "write its 'caption' in the manifest"
        else:
            hint = f"add a {item.target.with_suffix('.txt').name}"
        report.add("error", f"missing-{what}", item.id, f"no {what}; {hint}")
        return
    for text in item.captions:
        if placeholder := re.search(r"\{(trigger|caption)\}", text):  # filled in data.caption_template only
            report.add(
                "warning",
                "placeholder-in-caption",
                item.id,
                f"{what} {text[:60]!r} holds {placeholder[0]}, which trains as written: placeholders are filled in "
                "data.caption_template only; write the word itself",
            )
        full = format_caption(text, d)
        if tokenizer is not None:
            n = len(tokenizer(full, add_special_tokens=False)["input_ids"])
            if n > d.max_caption_tokens:
                report.add(
                    "error",
                    f"{what}-too-long",
                    item.id,
                    f"{n} tokens, over data.max_caption_tokens={d.max_caption_tokens}: {full[:60]!r}...",
                )
        if d.trigger_word and not re.search(rf"(?<!\w){re.escape(d.trigger_word)}(?!\w)", full, re.IGNORECASE):
            report.add(
                "warning",
                "missing-trigger",
                item.id,
                f"{what} {full[:60]!r} lacks the trigger word {d.trigger_word!r} (add it, or put {{trigger}} in data.caption_template)",
            )


# ------------------------------------------------------------------------------------------ the doctor


def load_tokenizer(cfg: Config):
    """The model's own tokenizer (processor/ subfolder), without any weights; None when it cannot be loaded."""

    try:
        check_pretrained(cfg.model.pretrained, cfg.model.revision)  # seconds, not a minute of hub retries
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
            report.add(
                "warning",
                "tokenizer-unavailable",
                "",
                f"could not load the tokenizer of {cfg.model.pretrained}; caption lengths not checked",
            )
    infos: dict[str, ImageInfo] = {}
    pair_deltas: list[tuple[str, np.ndarray]] = []
    readable: list[dict] = []  # for the duplicate checks
    for item in items:
        tinfo, timage, sources = check_item(item, cfg, tokenizer, report, infos)
        if item.id not in report.excluded:  # a copy of an excluded item may be the one worth keeping
            checked = [tinfo, *(s for s, _ in sources)]
            readable.append(
                {
                    "id": item.id,
                    "path": item.target,
                    "content": tuple(i.sha256 for i in checked),
                    "captions": item.captions,
                    "looks": [(i.phash, i.colour) for i in checked],
                }
            )
        if item.sources:
            flags = _check_pair(item, tinfo, timage, sources, report)
            if tinfo.features and sources and sources[0][0].features and not flags.get("identical"):
                pair_deltas.append((item.id, np.subtract(tinfo.features, sources[0][0].features)))
            if contact_sheet:
                report.pairs.append(
                    {
                        "id": item.id,
                        "instruction": item.captions[0] if item.captions else "",
                        "target": thumbnail(timage) if timage is not None else "",
                        "sources": [thumbnail(im) for _, im in sources if im is not None],
                    }
                )
    sim.check_swapped_direction(pair_deltas, report.add)
    sim.check_duplicates(readable, report.add)
    _check_shared_captions([it for it in items if it.id not in report.excluded], report.add)  # a copy: said already
    report.buckets = Counter(
        assign_bucket(*infos[str(it.target)].size, d.resolution, d.max_upscale)
        for it in items
        if it.id not in report.excluded and str(it.target) in infos and not infos[str(it.target)].error
    )
    by_item = defaultdict(list)
    for f in report.findings:
        by_item[f.item].append(f"{f.severity}: {f.code}: {f.message}")
    for p in report.pairs:
        p["flags"] = by_item.get(p["id"], [])
        p["excluded"] = p["id"] in report.excluded
    return report


def _check_shared_captions(items: list[Item], add) -> None:
    """Folder images of one name (photo.jpg, photo.png) train with one caption file, usually a copy exported twice."""
    by_file = defaultdict(list)
    for item in items:
        if item.caption_file is not None and item.captions:
            by_file[item.caption_file].append(item.id)
    for caption_file, ids in by_file.items():
        for later in ids[1:]:
            add(
                "warning",
                "shared-caption",
                later,
                f"takes its caption from {caption_file.name}, as {ids[0]} does: give one image another name and its "
                "own caption, or remove the copy",
            )


def _check_pair(item: Item, tinfo: ImageInfo, timage, sources, report: Report) -> dict:
    flags = {}
    add = report.add
    if _name_says_swapped(item):
        add(
            "warning",
            "swapped",
            item.id,
            f"file names suggest source and target are swapped ({item.sources[0].name} -> {item.target.name})",
        )
    for i, (sinfo, simage) in enumerate(sources):
        role = f"source {i + 1}"
        if tinfo.error or sinfo.error or timage is None or simage is None:
            continue
        if sinfo.sha256 == tinfo.sha256 or (
            sinfo.size == tinfo.size
            and np.abs(np.asarray(simage, np.int16) - np.asarray(timage, np.int16)).mean() < 0.5
            if simage.mode == timage.mode
            else False
        ):
            add("error", "source-equals-target", item.id, f"{role} is the same image as the target: nothing to learn")
            flags["identical"] = True
            continue
        if sinfo.size != tinfo.size:
            add(
                "warning",
                "size-mismatch",
                item.id,
                f"{role} is {sinfo.size[0]}x{sinfo.size[1]}, the target {tinfo.size[0]}x{tinfo.size[1]}: pixels are not aligned",
            )
        corr = sim.edge_correlation(simage, timage)
        dist = sim.hamming(sinfo.phash, tinfo.phash)
        if corr < 0.15 and dist > 20:
            add(
                "warning",
                "unrelated-pair",
                item.id,
                f"{role} and the target share no structure (edge correlation {corr:.2f}, pHash distance {dist}/64)",
            )
            continue
        # Offsets only mean something when the two images frame the same scene at the same aspect.
        sw, sh = sinfo.size
        tw, th = tinfo.size
        if abs(sw / sh - tw / th) < 0.01:
            shift = sim.offset(simage, timage)
            if shift is not None:
                dy, dx = shift
                add(
                    "warning",
                    "misaligned",
                    item.id,
                    f"{role} is offset from the target by ({dx:+d}, {dy:+d}) px (x, y): the adapter would learn to shift images",
                )
    return flags


def _name_says_swapped(item: Item) -> bool:
    words = lambda p: set(re.split(r"[^a-z]+", p.stem.lower()))  # noqa: E731
    return bool(words(item.target) & SOURCE_WORDS and not words(item.target) & TARGET_WORDS) and any(
        words(s) & TARGET_WORDS and not words(s) & SOURCE_WORDS for s in item.sources
    )
