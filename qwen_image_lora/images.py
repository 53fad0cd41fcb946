"""Image bytes in and out: JPEG/PNG/WebP inputs with pixel limits, PNG/JPEG/WebP outputs (JPEG has no alpha, so
it is composited on white)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_image_lora.io import atomic_path

INPUT_FORMATS = {"JPEG", "PNG", "WEBP"}
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MAX_INPUT_SIDE = 2048  # larger inputs are downscaled to fit 2048x2048 (the model works at ~1024 anyway)
MAX_DECODED_PIXELS = 64 * 2**20  # refused before decoding: a 100 KB PNG can claim 100,000 x 100,000 pixels


class ImageInputError(ValueError):
    """An input image we refuse: unreadable, wrong format, or too many pixels (`too_large`)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def decode_image(data: bytes, max_pixels: int = MAX_DECODED_PIXELS, max_side: int = MAX_INPUT_SIDE) -> Image.Image:
    """Bytes -> an RGB/RGBA PIL image (EXIF orientation applied) that fits max_side x max_side.

    A large input goes straight to about that size: JPEG decodes at 1/2, 1/4 or 1/8 scale (`draft`), other formats
    are reduced in their own mode (`thumbnail` reduces by whole factors first) before any conversion, so an 8192x8192
    PNG costs its decoded frame once, not again as an RGB(A) copy at full size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in INPUT_FORMATS:
                raise ImageInputError(f"unsupported image format {image.format}; send JPEG, PNG or WebP")
            w, h = image.size
            if w * h > max_pixels:  # checked from the header, before a single pixel is decoded
                raise ImageInputError(f"image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}", too_large=True)
            image = to_8bit(image)  # 16-bit greyscale: decoded here, at full size, as `convert` below would do
            has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
            mode = "RGBA" if has_alpha else "RGB"
            if max(w, h) > max_side:
                image.draft(None, _fit((w, h), max_side))  # JPEG only; a no-op for the other formats
                if image.mode not in ("L", "LA", "RGB", "RGBA"):  # palette indices, CMYK: convert first
                    image = image.convert(mode)
                image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            image.load()
            return ImageOps.exif_transpose(image).convert(mode)
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f"image refused as a decompression bomb: {e}", too_large=True) from e
    except UnidentifiedImageError as e:  # its message is the repr of our in-memory buffer: say it plainly
        raise ImageInputError("not a readable JPEG/PNG/WebP image (not an image format PIL recognises)") from e
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageInputError(f"not a readable JPEG/PNG/WebP image ({type(e).__name__}: {e})") from e


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image (I;16*, I, F) -> 8-bit "L", scaled by its range; any other mode unchanged.

    PIL's own `convert` clips these at 255, so a 16-bit PNG turns white. PNG's 16-bit greyscale opens as I;16 (I in
    older PIL), so I is read as 0..65535 too; F as 0..1 when it fits there (the usual float convention), else like
    I. PIL already reads 16-bit RGB(A) and grey+alpha PNGs as 8-bit RGB(A). `point` and `convert` keep `info` (EXIF).
    Shared by training data (`data.sources.open_image`) and inference inputs (`decode_image`)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    floats = image.convert("F")
    scale = 255 if image.mode == "F" and floats.getextrema()[1] <= 1 else 255 / 65535
    return floats.point(lambda v: v * scale + 0.5).convert("L")  # + 0.5: F -> L truncates


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def load_image(path: str | Path, **limits) -> Image.Image:
    path = Path(path)
    try:
        return decode_image(path.read_bytes(), **limits)
    except ImageInputError as e:
        raise ImageInputError(f"{path}: {e}", e.too_large) from e


def format_for(name: str) -> str:
    """`png`/`jpeg`/`jpg`/`webp` or a path with that extension -> PIL format name."""
    key = name.lower().rsplit(".", 1)[-1]
    if key not in OUTPUT_FORMATS:
        raise ValueError(f"output format {name!r}: use .png, .jpg/.jpeg or .webp")
    return OUTPUT_FORMATS[key]


def encode_image(image: Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    """PNG and WebP keep alpha; JPEG composites it over white."""
    fmt = format_for(fmt) if fmt.lower() in OUTPUT_FORMATS else fmt
    if fmt == "JPEG" and image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        image = white
    buf = io.BytesIO()
    options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def save_image(image: Image.Image, path: str | Path, quality: int = 95) -> Path:
    """Write atomically in the format the extension names."""
    path = Path(path)
    data = encode_image(image, format_for(path.name), quality)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
