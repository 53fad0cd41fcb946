"""The bundled sample data, generated (never downloaded): a small synthetic brand set and product edit pairs.

<out>/brand/NNN.png + NNN.txt      a product shape in the brand palette with the logo word, captioned
                                   with the trigger word (text-to-image items)
<out>/edits/NNN_source.png, NNN_target.png and <out>/edits/manifest.jsonl rows
                                   {"target", "instruction", "sources": [...]}: same product, moved from a
                                   coloured background onto white
<out>/manifest.jsonl               both kinds in one manifest (one adapter for generation and editing)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from qwen_image_lora.io import atomic_write_text, check_ours_to_write

TRIGGER = "qwnbrand"
BRAND_PALETTE = ["#d7263d", "#1b998b", "#f4d35e"]  # brand red, teal, yellow
PRODUCTS = ["bottle", "mug", "box", "can"]
BACKGROUNDS = {
    "white": "#ffffff",
    "marble grey": "#b8b8b8",
    "beach sand": "#e9d8a6",
    "forest green": "#2d6a4f",
    "night blue": "#14213d",
}
SIZES = [(128, 128), (160, 128), (128, 160)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_product(product: str, colour: str, background: str, size: tuple[int, int], word: str = "QWN") -> Image.Image:
    """A flat product shape in `colour` with the logo word, centred on a plain background."""
    w, h = size
    image = Image.new("RGB", size, background)
    d = ImageDraw.Draw(image)
    cx, cy = w // 2, h // 2
    bw, bh = w // 3, h // 2
    if product == "bottle":
        d.rectangle([cx - bw // 2, cy - bh // 2, cx + bw // 2, cy + bh // 2], fill=colour)
        d.rectangle([cx - bw // 6, cy - bh // 2 - h // 8, cx + bw // 6, cy - bh // 2], fill=colour)
    elif product == "mug":
        d.rectangle([cx - bw // 2, cy - bh // 3, cx + bw // 2, cy + bh // 2], fill=colour)
        d.ellipse([cx + bw // 2 - 4, cy - bh // 6, cx + bw // 2 + bw // 3, cy + bh // 4], outline=colour, width=5)
    elif product == "box":
        d.rectangle([cx - bw * 3 // 4, cy - bh // 3, cx + bw * 3 // 4, cy + bh // 3], fill=colour)
    else:
        d.ellipse([cx - bw // 2, cy - bh // 2, cx + bw // 2, cy + bh // 2], fill=colour)
    d.text((cx, cy), word, fill="#ffffff", anchor="mm", font=_font(max(10, w // 10)))
    return image


def is_sample_data(folder: str | Path) -> bool:
    """`folder` holds what make_sample_data writes (its manifests are written last)."""
    folder = Path(folder)
    return (folder / "manifest.jsonl").is_file() and (folder / "edits" / "manifest.jsonl").is_file()


def make_sample_data(
    output_dir: str | Path, seed: int = 0, n_brand: int = 12, n_edits: int = 8, overwrite: bool = False
) -> Path:
    """Write the sample data set and return its folder; one that holds it already is kept (a caption edited there
    stays) unless `overwrite`, and one that holds anything else is refused."""
    out = Path(output_dir)
    made = is_sample_data(out)
    if made and not overwrite:
        return out
    check_ours_to_write(out, "sample data", made)
    rng = random.Random(seed)
    # Edits are the catalogue job "put it on white": sources on coloured backgrounds, targets on white. Brand
    # images avoid those targets' combinations, so the data doctor finds no duplicates or swapped pairs here.
    combos = [(p, c, b) for p in PRODUCTS for c in BRAND_PALETTE for b in BACKGROUNDS]
    rng.shuffle(combos)
    edit_combos = [combo for combo in combos if combo[2] != "white"][:n_edits]
    targets = {(p, c, "white") for p, c, _ in edit_combos}
    brand_combos = [combo for combo in combos if combo not in edit_combos and combo not in targets][:n_brand]
    brand = out / "brand"
    brand.mkdir(parents=True, exist_ok=True)
    for i, (product, colour, bg_name) in enumerate(brand_combos):
        size = rng.choice(SIZES)
        draw_product(product, colour, BACKGROUNDS[bg_name], size).save(brand / f"{i:03d}.png")
        atomic_write_text(
            brand / f"{i:03d}.txt",
            f"a {TRIGGER} {product} with the QWN logo on a {bg_name} background, product photo",
        )

    edits = out / "edits"
    edits.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (product, colour, src_bg) in enumerate(edit_combos):
        size = rng.choice(SIZES)
        draw_product(product, colour, BACKGROUNDS[src_bg], size).save(edits / f"{i:03d}_source.png")
        draw_product(product, colour, BACKGROUNDS["white"], size).save(edits / f"{i:03d}_target.png")
        rows.append(
            {
                "target": f"{i:03d}_target.png",
                "instruction": f"replace the background with white, keep the {TRIGGER} {product} the same",
                "sources": [f"{i:03d}_source.png"],
            }
        )
    atomic_write_text(edits / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    mixed = [{"image": f"brand/{i:03d}.png", "caption": (brand / f"{i:03d}.txt").read_text()} for i in range(n_brand)]
    mixed += [{**r, "target": f"edits/{r['target']}", "sources": [f"edits/{s}" for s in r["sources"]]} for r in rows]
    atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in mixed))
    return out
