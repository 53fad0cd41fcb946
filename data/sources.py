"""Where training items come from: a folder of images with same-name .txt captions, a JSONL or CSV manifest,
or a Hugging Face `datasets` dataset (a `save_to_disk` folder, or an `imagefolder` with metadata).

An `Item` is one training example: a target image with its captions (text-to-image) or a target image with
its instructions and 1-10 reference images (edit). Paths are absolute; nothing here decodes an image.

Manifest rows: t2i {image, caption}; edit {target, instruction, sources: [1..10 images], optional mask}. A caption or
instruction may be a list (one is picked at random per step); in a CSV, `sources` holds paths separated by
`|` and several captions are separated by `||`. HF datasets use `data.columns` to map our names (image,
caption, target, instruction, sources) to theirs; images stored inside the dataset (bytes, not paths) are
written once, content-addressed, under `<cache_dir>/hf-images/` (the default cache when `data.cache_dir` is null, never
the dataset folder) so every later stage reads plain files.
"""

from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from qwen_image_lora import run_layout as layout
from qwen_image_lora.captions import fill_caption
from qwen_image_lora.config import ConfigError, DataConfig, default_cache_dir
from qwen_image_lora.errors import InputError
from qwen_image_lora.eval_config import EditExample
from qwen_image_lora.images import read_image
from qwen_image_lora.io import atomic_write_bytes, iter_jsonl, text_lines
from qwen_image_lora.knobs import SettingError, check_image_count, repeated_name

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass(frozen=True)
class Item:
    id: str
    target: Path
    captions: tuple[str, ...]  # t2i captions or edit instructions; one is picked per step
    sources: tuple[Path, ...] = ()  # reference images, in prompt order (edit items only)
    caption_file: Path | None = None  # the .txt the captions came from (folder items)
    # Problems found while listing the item, as (code, message): the doctor reports them as errors.
    issues: tuple[tuple[str, str], ...] = ()
    mask: Path | None = None  # edit items: white where the target differs from the edited image (loss weighting)
    # What decides the held-out draw when it is not the id: a manifest row's target as written. Its id is its line,
    # and by line an inserted row moved items the run had trained on into the held-out set.
    split_key: str | None = None

    @property
    def held_out_key(self) -> str:
        return self.split_key or self.id

    @property
    def kind(self) -> str:
        return "edit" if self.sources else "t2i"


class DataError(InputError):
    """Bad input data, naming the file (and line) and what to do."""


def _check_sources(count: int, where: str) -> None:
    """An edit row's references, by the one rule every edge uses (`knobs.check_image_count`)."""
    try:
        check_image_count(count, least=1, field="sources")
    except SettingError as e:
        raise DataError(f"{where}: {e}", "sources") from None


def load_items(cfg: DataConfig) -> list[Item]:
    if cfg.path is None:
        raise DataError("data.path: not set; point it at an image folder or a .jsonl manifest")
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(
            f"data.path: {path} does not exist; point it at a folder of images with .txt captions, a .jsonl/.csv "
            "manifest or a Hugging Face dataset folder"
        )
    fmt = source_format(cfg)
    if fmt == "folder":
        return _load_folder(path)
    if fmt == "manifest":
        try:
            return _load_manifest(path)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the manifest as UTF-8"
            ) from None
    if fmt == "hf":
        return _load_hf(path, cfg)
    raise DataError(f"data.format: {fmt!r} is not supported by this loader")


def source_format(cfg: DataConfig) -> str:
    """`data.format`, or what `auto` finds at `data.path`: a `datasets` folder, an image folder or a manifest."""
    path = Path(cfg.path)
    if cfg.format != "auto":
        return cfg.format
    if not path.is_dir():
        return "manifest"
    return "hf" if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() else "folder"


def _read_captions(path: Path) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(captions, issues): one caption per non-empty line (several lines = several captions chosen at random);
    a caption file that cannot be read or decoded is an issue of its item, not of the whole data set."""
    if not path.is_file():
        return (), ()
    try:
        text = path.read_text(encoding="utf-8-sig")  # Notepad's byte-order mark is no part of the caption
    except UnicodeDecodeError as e:
        return (), (
            ("caption-not-utf8", f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8"),
        )
    except OSError as e:
        return (), (("unreadable-caption", f"cannot read {path.name}: {e.strerror or e}"),)
    return tuple(line.strip() for line in text_lines(text) if line.strip()), ()


def _link_problem(path: Path) -> tuple[str, str] | None:
    """Why an image-named symbolic link leads nowhere (a loop or a missing target); None when it is fine."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return ("symlink-loop", f"{path.name} is a symbolic link that leads back to itself; point it at the image")
    except OSError as e:
        if e.errno == errno.ELOOP:
            return ("symlink-loop", f"{path.name} is a symbolic link that leads back to itself; point it at the image")
        return ("missing-file", f"{path.name} is a symbolic link to {os.readlink(path)}, which does not exist")
    return None


def _image_files(folder: Path):
    """The image-named files under `folder`, leaving out hidden files and folders (`.ipynb_checkpoints`' copies,
    `.trash`, macOS's `._photo.jpg`) and a run folder of ours inside it (an output_dir under data.path fed each run's
    previews to the next)."""
    seen = set()  # linked folders are followed ("subfolders are read" left them out); a link back up is not
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (Path(root) / d / layout.RUN_ID).is_file()]
        yield from (Path(root) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)


def _load_folder(folder: Path) -> list[Item]:
    named = sorted(_image_files(folder))
    items = []
    for p in named:
        link = _link_problem(p) if p.is_symlink() else None
        if not link and not p.is_file():
            continue
        captions, issues = _read_captions(p.with_suffix(".txt"))
        target = p.absolute() if link else p.resolve()
        items.append(
            Item(
                str(p.relative_to(folder)),
                target,
                captions,
                (),
                p.with_suffix(".txt"),
                (link, *issues) if link else issues,
            )
        )
    if not items:
        raise DataError(f"data.path: {folder} holds no .jpg/.jpeg/.png/.webp images")
    return items


def _load_manifest(path: Path) -> list[Item]:
    if path.suffix.lower() == ".csv":
        return _load_csv(path)
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"data.path: {path} is not a folder or a .jsonl/.csv manifest")
    items = [
        _row_to_item(row, path.parent, where, f"{path.name}:{where.rsplit(':', 1)[1]}")
        for where, row in iter_jsonl(path, DataError)
    ]
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


ROW_KEYS = ("image", "caption", "target", "instruction", "sources", "mask")


def _check_near_misses(row: dict, where: str) -> None:
    """A key one typo away from a missing key of ours (`captoin`) is refused naming it; other keys are the user's own
    columns (a SKU, a note) and are left alone."""
    for key in row:
        if key not in ROW_KEYS:
            close = difflib.get_close_matches(key, [k for k in ROW_KEYS if k not in row], n=1, cutoff=0.75)
            if close:
                raise DataError(f"{where}: unknown key {key!r}; did you mean {close[0]!r}?")


def _row_to_item(row: dict, base: Path, where: str, item_id: str) -> Item:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    _check_near_misses(row, where)
    if "sources" in row or "instruction" in row:
        missing = [k for k in ("target", "instruction", "sources") if k not in row]
        if missing:
            raise DataError(f"{where}: edit rows need target, instruction and sources; missing {', '.join(missing)}")
        sources = row["sources"] if isinstance(row["sources"], list) else [row["sources"]]
        _check_sources(len(sources), where)
        return Item(
            id=item_id,
            target=_row_path(base, row["target"], where, "target"),
            split_key=str(Path(row["target"])),  # after the check that it is a path
            captions=_as_captions(row["instruction"], where, "instruction"),
            sources=tuple(_row_path(base, s, where, "sources") for s in sources),
            mask=_row_path(base, row["mask"], where, "mask") if row.get("mask") else None,
        )
    if "image" not in row:
        has = ", ".join(map(repr, row)) or "nothing"
        raise DataError(f"{where}: t2i rows need 'image' (and 'caption'); this row has {has}; edit rows need target, "
                        "instruction, sources")  # fmt: skip
    return Item(
        id=item_id,
        target=_row_path(base, row["image"], where, "image"),
        split_key=str(Path(row["image"])),  # after the check that it is a path
        captions=_as_captions(row.get("caption"), where, "caption"),
    )


def _row_path(base: Path, value, where: str, key: str) -> Path:
    """A manifest row's file, relative to the manifest; anything but a non-empty string (5, null, a list) is refused
    naming the line and key: it was a TypeError traceback from `base / 5`."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} must be a file path (a string), got {json.dumps(value)}", key)
    return (base / value).resolve()


def _load_csv(path: Path) -> list[Item]:
    items = []
    with path.open(newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a byte-order mark
        reader = csv.reader(f)
        header, end = next(reader, []), reader.line_num
        if twice := repeated_name(k.strip() for k in header if k.strip()):
            raise DataError(f"{path}:1: column {twice[1]!r} is given twice; keep one (a cell may hold "
                            "several captions joined by ||)")  # fmt: skip
        for values in reader:
            # A row's first line: a quoted cell may span lines, so counting rows named the wrong line after one.
            lineno, end = end + 1, reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header) and any(v.strip() for v in values[len(header) :]):  # was cut at the comma
                raise DataError(f"{path}:{lineno}: {len(values)} cells for {len(header)} columns; put a cell that "
                                'holds a comma in double quotes ("a can, red")')  # fmt: skip
            row = {k.strip(): v.strip() for k, v in zip(header, values) if k}
            row = {k: v for k, v in row.items() if v}
            for key in ("caption", "instruction"):
                if key in row and "||" in row[key]:
                    row[key] = [c.strip() for c in row[key].split("||")]
            if "sources" in row:
                row["sources"] = [s.strip() for s in row["sources"].split("|") if s.strip()]
            items.append(_row_to_item(row, path.parent, f"{path}:{lineno}", f"{path.name}:{lineno}"))
    if not items:
        raise DataError(f"{path}: the manifest has no rows")
    return items


def _load_hf(path: Path, cfg: DataConfig) -> list[Item]:
    """A `save_to_disk` dataset (DatasetDict: `data.split`) or an `imagefolder` folder with metadata.jsonl/.csv."""
    import datasets  # noqa: PLC0415 - only for data.format: hf (a slow import)

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        ds = datasets.load_dataset("imagefolder", data_dir=str(path))
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"data.split: {cfg.split!r} is not in {path} (splits: {', '.join(ds)})")
        ds = ds[cfg.split]
    cols = {name: cfg.columns.get(name, name) for name in ("image", "caption", "target", "instruction", "sources")}
    missing = [c for c in cfg.columns.values() if c not in ds.column_names]
    if missing:
        raise DataError(f"data.columns: {', '.join(missing)} not in {path} (columns: {', '.join(ds.column_names)})")
    edit = cols["target"] in ds.column_names and cols["sources"] in ds.column_names
    image_cols = [cols["target"], cols["sources"]] if edit else [cols["image"]]
    if not edit and cols["image"] not in ds.column_names:
        raise DataError(f"{path}: no {cols['image']!r} column; map yours with data.columns.image=<name>")
    text = "instruction" if edit else "caption"  # without it every item was "missing-caption: add a <hash>.txt"
    if cols[text] not in ds.column_names:
        raise DataError(f"{path}: no {cols[text]!r} column (columns: {', '.join(ds.column_names)}); map yours with "
                        f"data.columns.{text}=<name>")  # fmt: skip
    for c in image_cols:  # raw {bytes, path} instead of decoded PIL images
        feature = ds.features[c]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(c, datasets.Image(decode=False))
        elif isinstance(feature, (list, datasets.Sequence, getattr(datasets, "List", tuple))) and isinstance(
            getattr(feature, "feature", feature[0] if isinstance(feature, list) else None), datasets.Image
        ):
            ds = ds.cast_column(c, datasets.Sequence(datasets.Image(decode=False)))
    store = Path(cfg.cache_dir or default_cache_dir()) / "hf-images"  # null: not inside the user's dataset either
    items = []
    for i, row in enumerate(ds):
        where, item_id = f"{path}[{i}]", f"{path.name}[{i}]"
        if edit:
            sources = row[cols["sources"]]
            sources = sources if isinstance(sources, list) else [sources]
            _check_sources(len(sources), where)
            items.append(
                Item(
                    id=item_id,
                    target=_hf_image_path(row[cols["target"]], path, store, where),
                    captions=_as_captions(row.get(cols["instruction"]), where, cols["instruction"]),
                    sources=tuple(_hf_image_path(s, path, store, where) for s in sources),
                )
            )
        else:
            items.append(
                Item(
                    id=item_id,
                    target=_hf_image_path(row[cols["image"]], path, store, where),
                    captions=_as_captions(row.get(cols["caption"]), where, cols["caption"]),
                )
            )
    return items


def _hf_image_path(value, base: Path, store: Path, where: str) -> Path:
    """A plain file for an HF image cell: its bytes, written once; a cell without bytes, its path (relative to the
    data set's folder). The path was tried first, and a relative one against the working folder: a `bottle.jpg`
    there replaced the data set's own image, silently."""
    if isinstance(value, str):
        return (base / value).resolve()
    if not isinstance(value, dict):
        raise DataError(f"{where}: unsupported image cell {type(value).__name__}")
    data = value.get("bytes")
    if not data and value.get("path") and (base / value["path"]).is_file():
        return (base / value["path"]).resolve()
    if not data:
        raise DataError(f"{where}: the image cell has neither a readable path nor bytes")
    suffix = Path(value.get("path") or "").suffix.lower() or ".img"
    out = store / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not out.is_file():
        atomic_write_bytes(out, data)
    return out.resolve()


def check_edit_files(edits: list[EditExample], where: str) -> None:
    """Every file a config's edit examples name exists: previews and eval read them only after the model has loaded
    (training, `qwen-lora validate` and eval ask this first)."""
    for i, edit in enumerate(edits):
        named = [("images", path) for path in edit.images] + [("target", edit.target), ("mask", edit.mask)]
        for field, path in named:
            if path and not Path(path).is_file():
                raise ConfigError(f"{where}[{i}].{field}: {path} does not exist; fix the path or drop the edit")


def open_image(path: Path, alpha: str = "composite", background: str = "#ffffff") -> Image.Image:
    """The training image at `path` through the one reader (`qwen_image_lora.images`: EXIF orientation, 16-bit
    greyscale scaled to 8 bits); alpha composited on `background` or kept (RGBA). Any format PIL reads, and no pixel
    limit of its own: the doctor screens items (`data.max_megapixels`, a GIF named .png) before training reads them."""
    im = read_image(path, max_pixels=None, formats=None)
    if im.mode != "RGBA" or alpha == "keep":
        return im
    flat = Image.new("RGB", im.size, background)
    flat.paste(im, mask=im.getchannel("A"))
    return flat


def format_caption(caption: str, cfg: DataConfig) -> str:
    return fill_caption(cfg.caption_template, caption, cfg.trigger_word or "")
