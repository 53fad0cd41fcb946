"""Where training items come from: a folder of images with same-name .txt captions, or a JSONL manifest.

An `Item` is one training example: a target image with its captions (text-to-image) or a target image with
its instructions and 1-10 reference images (edit). Paths are absolute; nothing here opens an image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from qwen_image_lora.config import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
MAX_REFERENCE_IMAGES = 10


@dataclass(frozen=True)
class Item:
    id: str
    target: Path
    captions: tuple[str, ...]  # t2i captions or edit instructions; one is picked per step
    sources: tuple[Path, ...] = ()  # reference images, in prompt order (edit items only)

    @property
    def kind(self) -> str:
        return "edit" if self.sources else "t2i"


class DataError(ValueError):
    """Bad input data, naming the file (and line) and what to do."""


def load_items(cfg: DataConfig) -> list[Item]:
    if cfg.path is None:
        raise DataError("data.path: not set; point it at an image folder or a .jsonl manifest")
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "folder" if path.is_dir() else "manifest"
    if fmt == "folder":
        return _load_folder(path)
    if fmt == "manifest":
        return _load_manifest(path)
    raise DataError(f"data.format: {fmt!r} is not supported by this loader")


def _read_captions(path: Path) -> tuple[str, ...]:
    """One caption per non-empty line; several lines = several captions chosen at random."""
    if not path.is_file():
        return ()
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _load_folder(folder: Path) -> list[Item]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"data.path: {folder} holds no .jpg/.jpeg/.png/.webp images")
    return [
        Item(id=str(p.relative_to(folder)), target=p.resolve(), captions=_read_captions(p.with_suffix(".txt")))
        for p in images
    ]


def _load_manifest(path: Path) -> list[Item]:
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"data.path: {path} is not a folder or a .jsonl manifest")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        items.append(_row_to_item(row, path.parent, where, f"{path.name}:{lineno}"))
    if not items:
        raise DataError(f"{path}: the manifest has no rows")
    return items


def _as_captions(value, where: str, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v.strip())
    raise DataError(f"{where}: {field!r} must be a string or a list of strings")


def _row_to_item(row: dict, base: Path, where: str, item_id: str) -> Item:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    if "sources" in row or "instruction" in row:
        missing = [k for k in ("target", "instruction", "sources") if k not in row]
        if missing:
            raise DataError(f"{where}: edit rows need target, instruction and sources; missing {', '.join(missing)}")
        sources = row["sources"] if isinstance(row["sources"], list) else [row["sources"]]
        if not 1 <= len(sources) <= MAX_REFERENCE_IMAGES:
            raise DataError(f"{where}: 'sources' must list 1 to {MAX_REFERENCE_IMAGES} images (got {len(sources)})")
        return Item(
            id=item_id,
            target=(base / row["target"]).resolve(),
            captions=_as_captions(row["instruction"], where, "instruction"),
            sources=tuple((base / s).resolve() for s in sources),
        )
    if "image" not in row:
        raise DataError(f"{where}: t2i rows need 'image' (and 'caption'); edit rows need target, instruction, sources")
    return Item(id=item_id, target=(base / row["image"]).resolve(), captions=_as_captions(row.get("caption"), where, "caption"))


def open_image(path: Path, alpha: str = "composite", background: str = "#ffffff") -> Image.Image:
    """Decode with EXIF orientation applied; alpha composited on `background` or kept (RGBA)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if not has_alpha:
        return im.convert("RGB")
    im = im.convert("RGBA")
    if alpha == "keep":
        return im
    flat = Image.new("RGB", im.size, background)
    flat.paste(im, mask=im.getchannel("A"))
    return flat


def format_caption(caption: str, cfg: DataConfig) -> str:
    return cfg.caption_template.format(caption=caption, trigger=cfg.trigger_word or "").strip()
