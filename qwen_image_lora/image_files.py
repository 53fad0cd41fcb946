"""The image files this toolkit writes (PNG, JPEG, WebP; JPEG has no alpha, so it is composited on white), each
tagged sRGB and carrying the settings that made it, and the reader of those settings.

    encode_image(image, fmt, quality, settings) -> bytes   save_image(image, path, ...) -> path (atomic)
    read_settings(path_or_bytes) -> dict | None             the settings `encode_image(..., settings=)` wrote"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

from PIL import Image, PngImagePlugin

from qwen_image_lora.errors import InputError
from qwen_image_lora.images import INPUT_FORMATS, MAX_DECODED_PIXELS, SRGB_PROFILE, ImageInputError, opened
from qwen_image_lora.io import atomic_path
from qwen_image_lora.knobs import QUALITY

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
LAYER_FORMATS = (".psd", ".ora", ".zip")  # the layered files of `layers` (inference/layers.py writes them)
# 588 bytes, in every image written (untagged pixels are only assumed to be sRGB). littlecms stamps the profile's
# creation time into its header (bytes 24-35): a fixed one keeps the same settings giving the same file.
SRGB_ICC = SRGB_PROFILE.tobytes()[:24] + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + SRGB_PROFILE.tobytes()[36:]


def format_for(name: str) -> str:
    """`png`/`jpeg`/`jpg`/`webp` or a path with that extension -> PIL format name."""
    key = name.lower().rsplit(".", 1)[-1]
    if key not in OUTPUT_FORMATS:
        raise InputError(f"output format {name!r}: use .png, .jpg/.jpeg or .webp", "output")
    return OUTPUT_FORMATS[key]


# Where an image carries the settings that made it, as image generators' files do (A1111's `parameters` chunk,
# ComfyUI's `prompt`): a PNG iTXt chunk of this name; in JPEG/WebP, EXIF UserComment with Software set to this name.
SETTINGS_KEY = "qwen-image-lora"
_SOFTWARE, _EXIF_IFD, _USER_COMMENT = 0x0131, 0x8769, 0x9286
_ASCII = b"ASCII\0\0\0"  # UserComment's character-code prefix; the JSON is written with non-ASCII escaped
_JPEG_EXIF_BYTES = 65533  # a JPEG holds EXIF in one APP1 segment (PIL's limit); WebP and PNG have none this small


def settings_as_written(settings: dict | None, fmt: str, quality: int) -> dict | None:
    """The block a file of format `fmt` carries: `settings`, plus the quality of a lossy one (part of what made it:
    `--from` repeats it)."""
    return (
        {**settings, "quality": quality} if settings is not None and _pil_format(fmt) in ("JPEG", "WEBP") else settings
    )


def _pil_format(fmt: str) -> str:
    """An output format as PIL names it, from either spelling (`jpg` or `JPEG`)."""
    return format_for(fmt) if fmt.lower() in OUTPUT_FORMATS else fmt


def encode_image(
    image: Image.Image,
    fmt: str = "PNG",
    quality: int = QUALITY.default,
    settings: dict | None = None,
    png_text: dict[str, str] | None = None,
) -> bytes:
    """PNG and WebP keep alpha; JPEG composites it over white. `settings` (a JSON-able dict: what made the image) is
    written into the file, where `read_settings` finds it; no timestamp, so the same settings give the same bytes.
    `png_text`: further text chunks of a PNG (`read_png_text` reads one back)."""
    fmt = _pil_format(fmt)
    QUALITY.check("quality", quality)  # every edge refuses it; the Python API wrote a file at quality 500
    if fmt == "JPEG" and image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        image = white
    buf = io.BytesIO()
    # Tagged sRGB explicitly: PIL would otherwise write whatever profile `image.info` carries from an input
    options = {"icc_profile": SRGB_ICC, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {})}
    if fmt == "JPEG":  # full-resolution colour (PIL's default halves it): a masked edit's kept pixels stay within 1-2
        options["subsampling"] = 0
    if fmt == "WEBP" and quality == QUALITY.high:  # lossless, colour under transparency kept: lossy WebP halves
        options.update(lossless=True, exact=True, quality=80)  # chroma at any quality (kept pixels moved by ~98)
    settings = settings_as_written(settings, fmt, quality)
    if fmt == "PNG" and (settings is not None or png_text):
        options["pnginfo"] = PngImagePlugin.PngInfo()
        ours = {} if settings is None else {SETTINGS_KEY: json.dumps(settings, ensure_ascii=False)}
        for key, text in {**ours, **(png_text or {})}.items():
            options["pnginfo"].add_itxt(key, text)
    elif settings is not None:
        exif = Image.Exif()
        exif[_SOFTWARE] = SETTINGS_KEY
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII + json.dumps(settings).encode()
        options["exif"] = exif.tobytes()
        if fmt == "JPEG" and len(options["exif"]) > _JPEG_EXIF_BYTES:
            raise InputError(f"output: the settings take {len(options['exif']):,} bytes, more than the {_JPEG_EXIF_BYTES:,} "
                             "a JPEG's EXIF holds (very long prompts); write PNG or WebP", "output")  # fmt: skip
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def save_image(
    image: Image.Image,
    path: str | Path,
    quality: int = QUALITY.default,
    settings: dict | None = None,
    png_text: dict[str, str] | None = None,
) -> Path:
    """Write atomically in the format the extension names, with `settings` in it (`encode_image`)."""
    path = Path(path)
    data = encode_image(image, format_for(path.name), quality, settings, png_text)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def read_settings(source: bytes | str | Path) -> dict | None:
    """The settings `encode_image` wrote into a PNG, JPEG or WebP file; None when it carries none of ours (another
    tool's EXIF comment included). Raises ImageInputError for a file that is no such image, InputError for settings
    that are not a JSON object."""
    with opened(source, MAX_DECODED_PIXELS, INPUT_FORMATS) as im:
        if im.format == "PNG":
            # Ours precede the pixels (in `info`); `text` decodes the image to reach chunks another tool moved after.
            text = im.info.get(SETTINGS_KEY) or im.text.get(SETTINGS_KEY)
        else:
            exif = im.getexif()
            comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT) if exif.get(_SOFTWARE) == SETTINGS_KEY else None
            ours = isinstance(comment, bytes) and comment.startswith(_ASCII)
            text = comment[len(_ASCII) :].decode("ascii", "replace") if ours else None
    if text is None:
        return None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        name = f"{source}: " if isinstance(source, (str, Path)) else ""
        raise InputError(f"{name}its {SETTINGS_KEY} settings are damaged (not a JSON object)")
    return settings


def ours_to_replace(path: str | Path) -> bool:
    """Whether an existing file at an output path may be written over: an image carrying settings of ours (damaged
    ones too), or an empty file. Anything else is kept: a user's own image, one of ours retouched and exported since
    (`batch` rendered over such deliverables, `generate` over any file), and a file we cannot read, such as an
    artboard past our pixel limit or a TIFF named .png (both were replaced unread)."""
    path = Path(path)
    if not path.is_file():  # a folder of that name
        return False
    if path.stat().st_size == 0:
        return True
    try:
        return read_settings(path) is not None
    except ImageInputError:
        return False
    except InputError:  # settings of ours that are damaged
        return True


def read_png_text(path: str | Path, key: str) -> str | None:
    """The text chunk `key` of a PNG (`encode_image(..., png_text=)`); None for another image or one without it.
    Raises ImageInputError for a file that is no such image."""
    with opened(path, MAX_DECODED_PIXELS, INPUT_FORMATS) as im:
        return (im.info.get(key) or im.text.get(key)) if im.format == "PNG" else None
