"""What makes a mask usable, decided from the mask alone (PIL, no torch): the jobs file's and the command line's
checks run it before the model's libraries import, and the generator runs it again (`masking.py` does the edit)."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from qwen_image_lora.errors import InputError
from qwen_image_lora.presets import same_aspect

log = logging.getLogger(__name__)


class MaskError(InputError):
    """A mask we refuse, with what to do about it."""

    def __init__(self, message: str, field: str | None = "mask"):
        super().__init__(message, field)


def check_aspect(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """A mask of another aspect ratio than its image is refused: resizing it would distort it."""
    if not same_aspect(mask_size, image_size):
        (mw, mh), (iw, ih) = mask_size, image_size
        raise MaskError(f"mask: {mw}x{mh} has another aspect ratio than the image ({iw}x{ih}); resizing it would "
                        "distort it. Export the mask at the image's size.")  # fmt: skip


def prepare_mask(mask: Image.Image, size: tuple[int, int], warn: bool = True, subject: bool = False) -> Image.Image:
    """The mask as 8-bit grey at its image's `size` (white = may change). Resized when only the scale differs.
    `warn=False`: an edge's check before the model loads, which the generator's own call repeats. `subject`: a layers
    mask, white on the subject: its refusals say so (they spoke of a masked edit's "may change" and "plain edit")."""
    grey = mask.convert("RGBA").getchannel("A") if _alpha_only(mask) else mask.convert("L")
    if grey.size != size:
        check_aspect(grey.size, size)
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    lo, hi = grey.getextrema()
    if subject and hi < 128:
        raise MaskError("mask: no subject (it is black everywhere); paint the subject white and the rest black")
    if subject and lo >= 128:
        raise MaskError("mask: the subject covers the whole image (white everywhere), so no background is left for its "
                        "layer; paint the subject white and the rest black")  # fmt: skip
    if hi < 128:
        raise MaskError(
            "mask: the mask changes nothing (it is black everywhere); paint white where the image may change"
        )
    if lo >= 128 and warn:
        log.warning("mask: white everywhere, so this is a plain edit (nothing is kept)")
    return grey


def _alpha_only(mask: Image.Image) -> bool:
    """A transparent layer painted where it may change carries the mask in its alpha: the paint is one flat colour
    wherever it shows (GIMP's white brush, a red quick mask; the colour under fully transparent pixels is whatever the
    editor left there). Only a flat grey counted: a yellow brush read as "white everywhere", a red one as "black
    everywhere", and a white brush over (0, 0, 0, 0) lost its soft edge to the brightness of the hidden black."""
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        return False
    rgba = np.asarray(mask.convert("RGBA")).astype(np.int16)
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # opaque everywhere: its brightness is the mask
        return False
    # The colour where the paint clearly shows: a faint edge pixel's colour is rounded (a canvas stores colour times
    # alpha), so a red brush's alpha-1 pixels may read orange.
    shown = rgba[..., :3][alpha >= 128]  # none: nothing is painted clearly, so its alpha changes nothing
    return len(shown) == 0 or int((shown.max(axis=0) - shown.min(axis=0)).max()) <= 2
