"""Layered output for designers: the product as a cut-out, the background without it, and generated elements
(a badge, a sticker, a text plate) they can move, written as PSD, OpenRaster or a ZIP of PNGs.

Every layer comes from the one sampling path (`Generator.generate`): the background is a masked edit over the
subject, each element a text-to-image generation whose alpha is the model's own (the 2.1 VAE is RGBA-native).
The subject's alpha is the mask as given; the background's edit covers every pixel the subject touches (its
feather band lies outside them), so moving the subject reveals no second one. The flattened image is the layers
alpha-composited bottom to top, so it equals what any editor shows.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

from PIL import Image, ImageChops, ImageOps
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer
from psd_tools.constants import Resource, Tag
from psd_tools.psd.image_resources import ImageResource
from psd_tools.psd.tagged_blocks import TaggedBlocks

from qwen_image_lora import model as qmodel
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import LAYER_FORMATS, SRGB_ICC, encode_image, read_png_text, save_image
from qwen_image_lora.images import ImageInputError
from qwen_image_lora.inference import masking
from qwen_image_lora.inference.mask_rules import MaskError, prepare_mask
from qwen_image_lora.io import atomic_path
from qwen_image_lora.knobs import DEFAULT_BACKGROUND_PROMPT
from qwen_image_lora.presets import MAX_SIDE, SIDE_MULTIPLE

log = logging.getLogger(__name__)

AUTO_MASK_PROMPT = "isolate the main object on a transparent background"
MAX_ELEMENTS = 8  # each element is a generation of its own: a request's time grows with them
MEDIA_TYPES = {"psd": "image/vnd.adobe.photoshop", "ora": "image/openraster", "zip": "application/zip"}


class LayersError(InputError):
    """A layers request we refuse, naming the bad part."""


@dataclass
class Element:
    """A generated element: its prompt and its box (left, top, width, height) in the input's pixels."""

    prompt: str
    box: tuple[int, int, int, int]

    @classmethod
    def parse(cls, text: str) -> "Element":
        """`PROMPT@x,y,w,h`, e.g. `a red SALE badge@40,40,256,128`; the limits are the HTTP API's (x, y >= 0,
        width, height >= 1)."""
        prompt, at, box = text.strip().rpartition("@")
        parts = [p.strip() for p in box.split(",")]
        if not at or not prompt.strip() or len(parts) != 4 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
            raise LayersError(
                f"element {text!r}: write it as PROMPT@x,y,w,h, e.g. 'a red SALE badge@40,40,256,128'", "elements"
            )
        x, y, w, h = (int(p) for p in parts)
        for name, value, low in (("x", x, 0), ("y", y, 0), ("width", w, 1), ("height", h, 1)):
            if value < low:
                raise LayersError(f"element {text!r}: {name} must be >= {low} (got {value})", "elements")
        return cls(prompt.strip(), (x, y, w, h))


@dataclass
class Layer:
    name: str
    image: Image.Image  # RGBA, the layer's own size
    left: int = 0
    top: int = 0

    def __post_init__(self):
        # An element's prompt names its layer; control characters (and what XML 1.0 forbids) made OpenRaster's
        # stack.xml unreadable to GIMP and Krita, so they become spaces in every format.
        self.name = _UNWRITABLE.sub(" ", self.name)


_UNWRITABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


@dataclass
class Layers:
    size: tuple[int, int]
    layers: list[Layer] = field(default_factory=list)  # bottom to top

    def composite(self) -> Image.Image:
        canvas = Image.new("RGBA", self.size, (0, 0, 0, 0))
        for layer in self.layers:
            canvas.alpha_composite(layer.image.convert("RGBA"), (layer.left, layer.top))
        return canvas


def check_request(image: Image.Image, mask: Image.Image | str, elements: list[Element]) -> Image.Image | str:
    """What a layers request needs no model for: each element's box inside the image, the mask's rules
    (`mask_rules.prepare_mask`). Returns the prepared mask, or "auto". `build_layers` (the CLI's and the server's path)
    runs it first; the CLI also runs it before loading the model."""
    if len(elements) > MAX_ELEMENTS:
        raise LayersError(f"element: at most {MAX_ELEMENTS} elements (got {len(elements)})", "elements")
    w, h = image.size
    for i, element in enumerate(elements):
        x, y, bw, bh = element.box
        if min(x, y) < 0 or x + bw > w or y + bh > h:
            raise LayersError(f"element {element.prompt!r}: box {element.box} leaves the {w}x{h} image", "elements", i)
    if isinstance(mask, str):
        if mask != "auto":
            raise LayersError(f"mask: give a mask image or 'auto' (got {mask!r})", "mask")
        return mask
    return prepare_mask(mask, image.size, subject=True)


def build_layers(
    generator, request, mask: Image.Image | str, background_prompt: str | None, elements: list[Element]
) -> Layers:
    """`request` (a `GenerationRequest` with exactly one image) carries seed, steps, guidance and adapters for
    every generation; `mask` is white on the subject, or "auto" to take it from the model's own cut-out."""
    if len(request.images) != 1:
        raise LayersError(f"images: layers take exactly one input image (got {len(request.images)})", "image")
    image = request.images[0]
    subject_mask = check_request(image, mask, elements)
    if isinstance(subject_mask, str):
        try:
            subject_mask = prepare_mask(_auto_mask(generator, request), image.size, subject=True)
        except MaskError as e:  # the model's own cut-out found no subject, or only one
            raise LayersError(
                f"{e} (the model's cut-out for mask 'auto' gave this: give a mask image)", "mask"
            ) from None
    # The edit's feather band lies outside the subject, so every pixel the subject touches is inpainted.
    hole = masking.grow(subject_mask, request.mask_feather)
    if hole.getextrema()[0] >= 128:  # masked edit's "white everywhere" warning spoke of a mask the user never drew
        log.warning("layers: the subject grown by mask_feather=%d px covers the whole image, so the background is an "
                    "edit of all of it (none of the input's pixels are kept)", request.mask_feather)  # fmt: skip
        hole = None
    background = generator.generate(_with(request, prompt=background_prompt or DEFAULT_BACKGROUND_PROMPT, mask=hole))
    subject = image.convert("RGBA")
    # The mask as given (a soft edge stays soft), times the input's own alpha: coverage times opacity.
    subject.putalpha(ImageChops.multiply(subject.getchannel("A"), subject_mask))
    layers = Layers(image.size, [Layer("background", background.convert("RGBA")), Layer("subject", subject)])
    for i, element in enumerate(elements):
        x, y, bw, bh = element.box
        width, height = _element_size(bw, bh, generator.resolution)
        made = generator.generate(
            _with(
                request,
                prompt=element.prompt,
                images=[],
                width=width,
                height=height,
                mask=None,
                seed=request.seed + 1 + i,
            )
        )
        layers.layers.append(
            Layer(f"element {i + 1}: {element.prompt[:40]}", ImageOps.fit(made.convert("RGBA"), (bw, bh)), x, y)
        )
    return layers


def _element_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """An element renders at the model's pixel budget with its box's aspect (the sizing rule; each side rounded to the
    grid on its own rendered a 10x40 badge square and squeezed it 4x), at most MAX_SIDE; `ImageOps.fit` crops the
    grid's rounding off and scales it into the box."""
    w, h = qmodel.fit_size(width, height, resolution)
    scale = min(1.0, MAX_SIDE / max(w, h))
    return tuple(max(SIDE_MULTIPLE, int(s * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE) for s in (w, h))


def _auto_mask(generator, request) -> Image.Image:
    cutout = generator.generate(_with(request, prompt=AUTO_MASK_PROMPT, mask=None))
    return cutout.convert("RGBA").getchannel("A").resize(request.images[0].size)


def _with(request, **changes):
    return dataclasses.replace(request, **changes)


# ------------------------------------------------------------------------------------------ writing


# The flattened image's mark (a PNG text chunk naming its layered file): a PNG without it is not ours to replace.
FLATTENED_KEY = "qwen-image-lora-flattened"


def check_outputs_free(path: str | Path) -> None:
    """Refuse an output that would replace a file `layers` did not write: the layered file itself (a designer's
    retouched PSD of that name was overwritten without a word) or its flattened image (`<stem>.png`, written beside
    it). A layered file is ours when the flattened image beside it names it; an empty one is a write cut short."""
    path, flat = Path(path), Path(path).with_suffix(".png")
    try:
        marked = read_png_text(flat, FLATTENED_KEY) if flat.exists() else None
    except ImageInputError:
        marked = None
    if flat.exists() and marked is None:
        raise LayersError(f"output: {flat} exists and is not a flattened image of layers (which writes <name>.png "
                          "beside the layered file); move it or choose another output name", "output")  # fmt: skip
    if marked not in (None, path.name) and (flat.parent / marked).exists():  # sku.zip after sku.psd: one sku.png
        raise LayersError(f"output: {flat} is the flattened image of {flat.parent / marked}, and {path.name} would "
                          f"replace it (both flatten to {flat.name}); choose another output name", "output")  # fmt: skip
    if path.exists() and (not path.is_file() or path.stat().st_size) and marked != path.name:
        raise LayersError(f"output: {path} exists and was not written by layers (no flattened {flat.name} beside it "
                          "names it), so it is kept; move it or choose another output name", "output")  # fmt: skip
    # The flattened image deleted: sku.zip took sku.png, and sku.psd, orphaned, could not be written again.
    other = next((o for o in map(path.with_suffix, LAYER_FORMATS) if o.name != path.name and o.exists()), None)
    if marked is None and other is not None:
        raise LayersError(f"output: {other} is there, and {path.name} would flatten to the same {flat.name}; choose "
                          "another output name", "output")  # fmt: skip


def save_layers(layers: Layers, path: str | Path) -> list[Path]:
    """Write `path` (.psd, .ora or .zip) and the flattened image beside it (`<stem>.png`, marked as such); both
    atomic. Files there that layers did not write are refused (`check_outputs_free`)."""
    path = Path(path)
    if path.suffix.lower() not in LAYER_FORMATS:
        raise LayersError(f"output: {path.name}: use .psd, .ora or .zip", "output")
    check_outputs_free(path)
    data = encode_layers(layers, path.suffix.lower().lstrip("."))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    flat = save_image(layers.composite(), path.with_suffix(".png"), png_text={FLATTENED_KEY: path.name})
    return [path, flat]


def encode_layers(layers: Layers, fmt: str) -> bytes:
    """The layered file as bytes: `psd`, `ora` or `zip`."""
    return {"psd": _psd_bytes, "ora": _ora_bytes, "zip": _zip_bytes}[fmt](layers)


def _psd_bytes(layers: Layers) -> bytes:
    psd = PSDImage.new("RGBA", layers.size)
    psd.image_resources[Resource.ICC_PROFILE] = ImageResource(key=Resource.ICC_PROFILE, data=SRGB_ICC)
    for layer in layers.layers:
        # frompil writes the name only as the legacy Mac Roman Pascal string, which fails on a Chinese or emoji
        # element prompt; the `name` setter also writes the Unicode name ('luni') and a Mac Roman safe legacy one.
        pixel = PixelLayer.frompil(layer.image.convert("RGBA"), psd, "", layer.top, layer.left)
        pixel.name = layer.name
        psd.append(pixel)
    # A layered PSD's merged image keeps its alpha only under this tag (as Photoshop writes it); without it readers
    # of the merged image (Pillow, thumbnailers, asset managers) saw every pixel transparent.
    info = psd._record.layer_and_mask_information  # psd-tools has no public setter for document-level tags
    info.tagged_blocks = info.tagged_blocks or TaggedBlocks()
    info.tagged_blocks.set_data(Tag.SAVING_MERGED_TRANSPARENCY)
    buf = io.BytesIO()
    psd.save(buf)
    return buf.getvalue()


def _write(z: zipfile.ZipFile, name: str, data: str | bytes, compress_type: int = zipfile.ZIP_DEFLATED) -> None:
    # `writestr` given a bare name stores mode 0600, so unzipped layers were readable by their owner alone.
    info = zipfile.ZipInfo(name, time.localtime()[:6])
    info.external_attr = 0o644 << 16
    z.writestr(info, data, compress_type=compress_type)


def _ora_bytes(layers: Layers) -> bytes:
    """OpenRaster: `mimetype` first and stored, `stack.xml` listing layers top first, PNGs, a merged image."""
    w, h = layers.size
    entries = "".join(
        f'<layer name={quoteattr(layer.name)} src="data/layer{i}.png" x="{layer.left}" y="{layer.top}"/>'
        for i, layer in reversed(list(enumerate(layers.layers)))
    )
    stack = (
        f'<?xml version="1.0" encoding="UTF-8"?><image version="0.0.3" w="{w}" h="{h}"><stack>{entries}</stack></image>'
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        _write(z, "mimetype", "image/openraster", zipfile.ZIP_STORED)
        _write(z, "stack.xml", stack)
        for i, layer in enumerate(layers.layers):
            _write(z, f"data/layer{i}.png", encode_image(layer.image))
        merged = layers.composite()
        _write(z, "mergedimage.png", encode_image(merged))
        thumb = merged.copy()
        thumb.thumbnail((256, 256))
        _write(z, "Thumbnails/thumbnail.png", encode_image(thumb))
    return buf.getvalue()


_NOT_A_LETTER = re.compile(r"[\W_]+")  # of any script


def _zip_bytes(layers: Layers) -> bytes:
    """PNG layers plus `layers.json` with each layer's file, name and box, bottom to top."""
    index = []
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, layer in enumerate(layers.layers):
            # letters of any script survive (a Chinese prompt lost its whole name); path and other characters do not
            name = f"{i:02d}_{_NOT_A_LETTER.sub('_', layer.name.lower()).strip('_')}.png"
            _write(z, name, encode_image(layer.image))
            index.append(
                {
                    "file": name,
                    "name": layer.name,
                    "left": layer.left,
                    "top": layer.top,
                    "width": layer.image.width,
                    "height": layer.image.height,
                }
            )
        _write(z, "composite.png", encode_image(layers.composite()))
        table = {"width": layers.size[0], "height": layers.size[1], "layers": index}
        _write(z, "layers.json", json.dumps(table, indent=2))
    return buf.getvalue()
