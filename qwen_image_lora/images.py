"""The one image reader, used by training data, the data doctor, validation, evaluation and every inference input
(the files this toolkit writes, and the settings inside them: `image_files`).

    read_image(path_or_bytes, max_side=None) -> RGB or RGBA PIL image
    decode_image(bytes) / load_image(path)     -> the same, fitted to MAX_INPUT_SIDE / MAX_FILE_INPUT_SIDE
    decode_cost(bytes, max_side) -> DecodeCost  the memory that decode holds at its peak, known from the header
    identify(path_or_bytes) -> ImageHeader      format, size after EXIF orientation, mode, frames

Every read: the format checked from the header (JPEG, PNG or WebP for inference inputs: a GIF named .png is refused
as a GIF; training data takes whatever PIL reads), the pixel count refused before a pixel is decoded, EXIF
orientation applied, 16-bit greyscale scaled to 8 bits, colours in another RGB profile (a phone's Display P3, Adobe
RGB) converted to sRGB, the space the model's pixels mean and every written image is tagged with. An image larger
than `max_side` is shrunk before any conversion: JPEG decodes at 1/2-1/8 scale (`draft`); PNG and WebP decode their
full frame (PIL cannot decode them smaller) and are then resized strip by strip, so a palette, 1-bit or 16-bit frame
never gets an RGBA or float copy at full size. The frame itself, and WebP's decoder buffers, cannot be avoided:
`decode_cost` counts them so a service can admit decodes by the memory they take."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

from PIL import Image, ImageCms, UnidentifiedImageError

from qwen_image_lora.errors import InputError
from qwen_image_lora.presets import MAX_SIDE

INPUT_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}  # MPO: a phone's JPEG with a gain map or depth frame after the photo
MAX_INPUT_SIDE = 2048  # the service's inputs are downscaled to fit 2048x2048 (the model works at ~1024 anyway)
# A file's (the CLI, batch, previews, eval): up to the largest size written, so an edit of a 3000 px photo comes
# back at 3000 px with a masked edit's kept pixels exact (it came back at 2048, silently).
MAX_FILE_INPUT_SIDE = MAX_SIDE
MAX_DECODED_PIXELS = 64 * 2**20  # refused before decoding: a 100 KB PNG can claim 100,000 x 100,000 pixels
STRIP_BYTES = 4 * 2**20  # a large image is converted this many bytes of rows at a time
DECODER_BYTES = 2 * 2**20  # the decoder's own rows, tables and windows: 0.6-0.9 MB measured at 2048 px
_LANCZOS = Image.Resampling.LANCZOS
SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# PIL imports its common format plugins on the first open; done here, a first decode's memory is its pixels alone
# (`decode_cost` counts those, and the service admits decodes by it).
Image.preinit()
# `max_pixels` is the limit, checked right after PIL's own bomb warning (over ~89 M pixels), which only repeats it;
# past twice PIL's limit it raises DecompressionBombError itself. Filtered once here by its text: a per-call
# `warnings.catch_warnings` swaps process-wide filters, and decodes run on many threads.
warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels, could be decompression bomb",
                        category=Image.DecompressionBombWarning)  # fmt: skip
# A damaged EXIF block is read as far as it goes (its orientation, when that entry is whole); PIL warned with its own
# file and line, a two-line warning per such upload in the service's log.
warnings.filterwarnings("ignore", message=r"Corrupt EXIF data", category=UserWarning, module=r"PIL\.TiffImagePlugin")
# EXIF orientation -> the transpose that undoes it (as `ImageOps.exif_transpose`)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # fmt: skip


class ImageInputError(InputError):
    """An image we refuse. `code`: unreadable, unsupported-format, huge (too many pixels, a decompression bomb, or more
    memory than a decode budget: `too_large`), truncated or corrupt."""

    def __init__(self, message: str, too_large: bool = False, code: str | None = None):
        super().__init__(message)
        self.code = code or ("huge" if too_large else "unreadable")
        self.too_large = self.code == "huge"


class ImageHeader(NamedTuple):
    format: str
    size: tuple[int, int]  # (width, height) after EXIF orientation
    mode: str  # as decoded, before any conversion
    frames: int = 1  # an animation's frames (only the first is read)


class DecodeCost(NamedTuple):
    bytes: int  # peak memory of `read_image(data, max_side)`, decoded frame and temporaries together
    what: str  # e.g. "8000x8000 WEBP (RGB)", for a refusal


@contextlib.contextmanager
def opened(source: bytes | str | Path, max_pixels: int | None, formats: set[str] | None) -> Iterator[Image.Image]:
    """The image, opened (header read, no pixels) and checked: format (any PIL reads when `formats` is None), pixel
    count, bombs. Any PIL error raised while it is open, decoding included, becomes an ImageInputError with a code.
    The one `Image.open` of the package."""
    name = f"{source}: " if isinstance(source, (str, Path)) else ""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if formats is not None and im.format not in formats:
                raise ImageInputError(
                    f"{name}a {im.format} image, not JPEG, PNG or WebP: convert it", code="unsupported-format"
                )
            if formats is not None and getattr(im, "is_animated", False) and im.format != "MPO":  # MPO: photo + map
                raise ImageInputError(  # its first frame was used, silently, where a GIF is refused
                    f"{name}an animated {im.format} ({im.n_frames} frames): save the frame you mean as a still PNG or "
                    "JPEG", code="animated")  # fmt: skip
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:  # from the header, before a pixel is decoded
                raise ImageInputError(
                    f"{name}image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}", too_large=True
                )
            yield im
    except ImageInputError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own refusal, before its size reaches ours: said as ours is
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels[1]):,} pixels" if pixels else f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
        limit = max_pixels if max_pixels is not None else 2 * Image.MAX_IMAGE_PIXELS
        raise ImageInputError(f"{name}image is {size}; the limit is {limit:,}", too_large=True) from e
    except UnidentifiedImageError as e:  # its message is the repr of our in-memory buffer: say it plainly
        raise ImageInputError(f"{name}not a readable JPEG/PNG/WebP image (not an image format PIL recognises)") from e
    except MemoryError:
        raise
    except OSError as e:
        if e.errno is not None:  # the file system's error (missing, unreadable), not the image's
            raise
        raise _undecodable(name, e) from e
    except Exception as e:  # PIL raises many types for corrupt data
        raise _undecodable(name, e) from e


def _undecodable(name: str, e: Exception) -> ImageInputError:
    cut = "truncat" in str(e).lower() or "broken data stream" in str(e).lower()
    return ImageInputError(
        f"{name}not a readable JPEG/PNG/WebP image ({type(e).__name__}: {e})", code="truncated" if cut else "corrupt"
    )


def read_image(source: bytes | str | Path, max_side: int | None = None, max_pixels: int | None = MAX_DECODED_PIXELS,
               formats: set[str] | None = INPUT_FORMATS, colours: bool = True) -> Image.Image:  # fmt: skip
    """Bytes or a path -> an RGB or RGBA image (RGBA when the file has alpha; the first frame of an animation), EXIF
    orientation applied, fitting `max_side` x `max_side` when given (aspect kept), in sRGB. Training data passes
    `formats=None` (whatever PIL reads; the doctor names a file whose content its extension misnames); a mask passes
    `colours=False`: its numbers are coverage, not colour, so no profile applies. Raises ImageInputError (naming the
    path) with its `code`."""
    return read_with_header(source, max_side, max_pixels, formats, colours)[1]


def read_with_header(source: bytes | str | Path, max_side: int | None = None, max_pixels: int | None = MAX_DECODED_PIXELS,
                     formats: set[str] | None = INPUT_FORMATS, colours: bool = True) -> tuple[ImageHeader, Image.Image]:  # fmt: skip
    """`read_image`, and what `identify` says of the file, from one decode (the data doctor reports both)."""
    with opened(source, max_pixels, formats) as im:
        (w, h), mode, alpha = im.size, im.mode, _has_alpha(im)
        target = _target(im.size, max_side)
        if target is not None:
            im.draft(None, target)  # JPEG only: decodes at 1/2, 1/4 or 1/8 scale, still no smaller than the target
        im.load()
        orientation = im.getexif().get(0x0112, 1)
        final = "RGBA" if alpha else "RGB"
        to_srgb = _srgb_transform(im.info.get("icc_profile"), im.mode, final) if colours else None
        from_cmyk = to_srgb if im.mode == "CMYK" else None  # replaces PIL's naive CMYK -> RGB, so it comes first
        if target is not None:
            image = _shrink(im, target, final, from_cmyk)
        else:
            image = ImageCms.applyTransform(im, from_cmyk) if from_cmyk is not None else to_8bit(im)
        image = image.convert(final)  # a copy: nothing refers to the file's frame
        if to_srgb is not None and from_cmyk is None:  # on the fitted image: the transform costs one copy of it
            image = ImageCms.applyTransform(image, to_srgb)
        if to_srgb is not None:
            image.info.pop("icc_profile", None)
        header = ImageHeader(
            im.format, (h, w) if orientation in (5, 6, 7, 8) else (w, h), mode, getattr(im, "n_frames", 1)
        )
    return header, image.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else image


def decode_image(data: bytes, max_pixels: int = MAX_DECODED_PIXELS, max_side: int = MAX_INPUT_SIDE,
                 colours: bool = True) -> Image.Image:  # fmt: skip
    """An inference input: bytes -> RGB/RGBA that fits max_side x max_side (`colours=False` for a mask)."""
    return read_image(data, max_side, max_pixels, colours=colours)


def load_image(path: str | Path, max_pixels: int = MAX_DECODED_PIXELS, max_side: int = MAX_FILE_INPUT_SIDE,
               colours: bool = True) -> Image.Image:  # fmt: skip
    """An inference input from a file (the CLI, batch jobs, validation and eval edits): as `decode_image`, up to
    MAX_FILE_INPUT_SIDE."""
    return read_image(Path(path), max_side, max_pixels, colours=colours)


def identify(
    source: bytes | str | Path, max_pixels: int | None = None, formats: set[str] | None = INPUT_FORMATS
) -> ImageHeader:
    """Format, size after EXIF orientation, mode and frames, from the header (PIL reads a PNG through to find EXIF
    stored after its pixels). Refuses what `read_image` refuses before decoding."""
    with opened(source, max_pixels, formats) as im:
        w, h = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        return ImageHeader(im.format, (h, w) if turned else (w, h), im.mode, getattr(im, "n_frames", 1))


def has_alpha(path: str | Path) -> bool:
    """Whether `read_image` gives the file RGBA, from its header (memoised on path, size and mtime: training asks
    for every sample it fetches)."""
    return _header_facts(path)[0]


def converts_colours(path: str | Path) -> bool:
    """Whether `read_image` converts the file's colours to sRGB (its profile is another RGB space), from its header
    (memoised as `has_alpha`): the data cache keys such a file's latents apart from an unconverted read's."""
    return _header_facts(path)[1]


def _header_facts(path: str | Path) -> tuple[bool, bool]:
    st = os.stat(path)
    return _read_header_facts(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _read_header_facts(path: str, size: int, mtime_ns: int) -> tuple[bool, bool]:
    """(alpha, converted colours): one header read answers both questions a sample's cache key asks."""
    with opened(path, None, None) as im:
        return _has_alpha(im), _srgb_transform(im.info.get("icc_profile"), im.mode, "RGB") is not None


@functools.lru_cache(maxsize=64)  # a shoot's photos share one profile: built once, not per read
def _srgb_transform(icc: bytes | None, file_mode: str, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from an RGB(A) or palette file's embedded profile to sRGB, for images of `mode` (RGB or RGBA);
    from a CMYK file's profile, CMYK to sRGB (relative colorimetric with black point compensation, as Photoshop
    converts; print assets carry one, and PIL's own CMYK -> RGB ignores it: washed-out, shifted brand colours). None
    when the file needs none. Known from the header. A profile is sRGB by its description ("sRGB IEC61966-2.1",
    "sRGB built-in"): converting sRGB to sRGB would only round. A profile littlecms cannot build a transform from
    (damaged, cut short, an abstract or link class) is ignored, as browsers do; greyscale profiles are not applied."""
    if not icc or file_mode not in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK"):
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if file_mode == "CMYK":
            if space != "CMYK":
                return None
            flags = ImageCms.Flags.NOCACHE | ImageCms.Flags.BLACKPOINTCOMPENSATION
            return ImageCms.buildTransform(
                profile, SRGB_PROFILE, "CMYK", "RGB", ImageCms.Intent.RELATIVE_COLORIMETRIC, flags
            )
        if space != "RGB" or ImageCms.getProfileDescription(profile).startswith("sRGB"):
            return None
        # littlecms reads the tags only here. NOCACHE: a shared transform's one-pixel cache is not thread-safe.
        return ImageCms.buildTransform(profile, SRGB_PROFILE, mode, mode, flags=ImageCms.Flags.NOCACHE)
    except (OSError, ImageCms.PyCMSError):
        return None


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def _target(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """The size that fits max_side x max_side, or None when the image already fits."""
    if max_side is None or max(size) <= max_side:
        return None
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _shrink(im: Image.Image, size: tuple[int, int], final: str, from_cmyk=None) -> Image.Image:
    """A decoded frame -> `size`, Lanczos, with no full-size copy in another mode. L and RGB resize as they are. Any
    other mode goes strip by strip through the horizontal pass (converted to L, RGB or premultiplied RGBa, as a whole
    converted image would be), then the vertical pass runs on the narrow result: the same pixels as converting the
    whole image and resizing it, as PIL resamples in those two passes anyway. `from_cmyk`: a CMYK file's profile
    transform, which converts each strip in place of PIL's naive conversion."""
    if im.mode == "F":  # its 8-bit scale depends on the whole image's range (a float TIFF; never an inference input)
        im = to_8bit(im)
    grey = final == "RGB" and (im.mode in ("1", "L", "I") or im.mode.startswith("I;16"))
    working = "L" if grey else final
    if im.mode in ("L", "RGB") and im.mode == working:
        return im.resize(size, _LANCZOS)
    premultiplied = {"RGBA": "RGBa"}.get(working, working)  # as `Image.resize` does for RGBA
    (w, h), tw = im.size, size[0]
    wide = Image.new(premultiplied, (tw, h))
    rows = max(1, STRIP_BYTES // (4 * w))
    for y in range(0, h, rows):
        strip = to_8bit(im.crop((0, y, w, min(h, y + rows))))
        if from_cmyk is not None:
            strip = ImageCms.applyTransform(strip, from_cmyk)
        strip = strip.convert(working) if strip.mode != working else strip
        strip = strip.convert(premultiplied) if premultiplied != working else strip
        wide.paste(strip.resize((tw, strip.height), _LANCZOS), (0, y))
        del strip
    return wide.resize(size, _LANCZOS).convert(working)


def decode_cost(
    data: bytes, max_side: int | None = MAX_INPUT_SIDE, max_pixels: int | None = MAX_DECODED_PIXELS
) -> DecodeCost:
    """The peak memory `read_image(data, max_side)` takes, from the header alone (no pixels are decoded): the frame the
    decoder writes (JPEG: at its draft scale), what the decoder holds beside it, and the conversion temporaries. An
    upper bound, checked against measured peaks in tests/test_images.py."""
    with opened(data, max_pixels, INPUT_FORMATS) as im:
        (w0, h0), mode, fmt, info = im.size, im.mode, im.format, im.info
        sampling = [(c[1], c[2]) for c in getattr(im, "layer", None) or []]  # JPEG components' sampling factors
        target = _target(im.size, max_side)
        converted = _srgb_transform(im.info.get("icc_profile"), im.mode, "RGB") is not None
        turned = im.getexif().get(0x0112, 1) in _TRANSPOSE
        if target is not None:
            im.draft(None, target)
        w, h = im.size
    grey = mode in ("1", "L", "I", "F") or mode.startswith("I;16")
    held = 0
    if fmt == "WEBP":  # libwebp's canvas, its copy for the next frame, and the bytes PIL copies the frame from
        held = 3 * w * h * 4
    elif fmt == "JPEG" and ("progressive" in info or "progression" in info) and sampling:
        hmax, vmax = max(s[0] for s in sampling), max(s[1] for s in sampling)  # every DCT coefficient, 2 bytes each,
        held = int(w0 * h0 * 2 * sum(a * b / (hmax * vmax) for a, b in sampling))  # until the last scan
    if target is None:  # full size: to_8bit's float copies, then the RGB(A) copy, and the turned copy
        temporaries = w * h * (9 if grey and mode not in ("1", "L") else 4) + (w * h * 4 if turned else 0)
    else:  # the horizontal pass, the strips it reads, the result, its RGB(A) copy and the turned copy
        tw, th = target
        working = 1 if grey else 4
        strips = 0 if mode in ("L", "RGB") else 4 * STRIP_BYTES * (3 if grey else 1)
        temporaries = tw * h * working + strips + tw * th * (working + 4 + 4)
    temporaries += 4 * (target[0] * target[1] if target else w * h) if converted else 0  # sRGB's copy
    return DecodeCost(w * h * _bytes_per_pixel(mode) + held + temporaries + DECODER_BYTES, f"{w0}x{h0} {fmt} ({mode})")


def _bytes_per_pixel(mode: str) -> int:
    """Bytes of PIL's own storage per pixel: 1 for 1/L/P, 2 for I;16, else 4 (3-band images are stored in 4)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image (I;16*, I, F) -> 8-bit "L", scaled by its range; any other mode unchanged.

    PIL's own `convert` clips these at 255, so a 16-bit PNG turns white. PNG's 16-bit greyscale opens as I;16 (I in
    older PIL), so I is read as 0..65535 too; F as 0..1 when it fits there (the usual float convention), else like
    I. PIL already reads 16-bit RGB(A) and grey+alpha PNGs as 8-bit RGB(A). `point` and `convert` keep `info`."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    floats = image.convert("F")
    scale = 255 if image.mode == "F" and floats.getextrema()[1] <= 1 else 255 / 65535
    return floats.point(lambda v: v * scale + 0.5).convert("L")  # + 0.5: F -> L truncates
