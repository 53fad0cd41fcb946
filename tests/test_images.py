"""The one image reader (`qwen_image_lora/images.py`): a large input of every accepted format reads as PIL's own full
decode and resize would give it, without full-size copies in another mode (peak memory measured in a fresh process,
within what `decode_cost` counts); EXIF orientation is the same in training, validation, eval and inference; and the
service admits decodes by that cost (issues #24 and #25)."""

import base64
import io
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, JpegImagePlugin

from qwen_image_lora import images
from qwen_image_lora.config import Config, EditExample
from qwen_image_lora.data.sources import open_image
from qwen_image_lora.eval.evaluator import edit_sources
from qwen_image_lora.images import DecodeCost, ImageInputError, decode_cost, read_image, to_8bit
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.guards import DecodeGate
from qwen_image_lora.inference.server import create_app
from qwen_image_lora.train.validation import validation_requests

KEY = "images-key-0123456789"


def _scene(w: int, h: int) -> Image.Image:
    """Gradients (every tone) and a hard-edged disc (what resampling gets wrong first)."""
    g = Image.linear_gradient("L").resize((w, h))
    rgb = Image.merge("RGB", (g, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("L", (w, h), 90)))
    ImageDraw.Draw(rgb).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(200, 30, 30))
    return rgb


def _with_alpha(rgb: Image.Image) -> Image.Image:
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    return rgba


def _grey16(w: int, h: int) -> Image.Image:
    return Image.fromarray((np.linspace(0, 65535, w)[None, :] * np.ones((h, 1))).astype(np.uint16))  # mode I;16


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


# name -> (image at a size, format, save options); the decoded modes are those of issue #24's measurements
FORMATS = {
    "8-bit grey PNG": (lambda w, h: _scene(w, h).convert("L"), "PNG", {}),
    "JPEG": (_scene, "JPEG", {"quality": 95}),
    "1-bit PNG": (lambda w, h: _scene(w, h).convert("L").convert("1"), "PNG", {}),
    "palette+tRNS PNG": (lambda w, h: _scene(w, h).quantize(64), "PNG", {"transparency": 0}),
    "16-bit grey PNG": (_grey16, "PNG", {}),
    "lossless WebP": (_scene, "WEBP", {"lossless": True}),
    "RGBA lossless WebP": (lambda w, h: _with_alpha(_scene(w, h)), "WEBP", {"lossless": True}),
    "RGBA PNG": (lambda w, h: _with_alpha(_scene(w, h)), "PNG", {}),
    "CMYK JPEG": (lambda w, h: _scene(w, h).convert("CMYK"), "JPEG", {"quality": 95}),
}


def _reference(data: bytes, max_side: int) -> Image.Image:
    """PIL's own way: decode everything, convert at full size, then one Lanczos resize."""
    image = Image.open(io.BytesIO(data))
    alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
    image = to_8bit(image).convert("RGBA" if alpha else "RGB")
    scale = max_side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_large_input_reads_as_a_full_decode_and_resize_would_give_it(name):
    make, fmt, options = FORMATS[name]
    data = _encode(make(2400, 1800), fmt, **options)  # several conversion strips tall
    got, want = read_image(data, max_side=512), _reference(data, 512)
    assert (got.size, got.mode) == (want.size, want.mode) == ((512, 384), want.mode)
    diff = np.abs(np.asarray(got, int) - np.asarray(want, int))
    if fmt == "JPEG":  # decoded at half scale by libjpeg (`draft`): close to, not equal to, a full decode
        assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 8, (diff.mean(), diff.max())
    else:  # the strip-wise passes are the same arithmetic as PIL's whole-image ones
        assert diff.max() <= 1, diff.max()
    if name == "palette+tRNS PNG":  # the transparent palette entry stays transparent, the rest opaque
        alpha = np.asarray(got)[..., 3]
        assert alpha.min() == 0 and alpha.max() == 255
    if name == "16-bit grey PNG":  # the 16-bit ramp as 8-bit tones (PIL's own convert would clip it to white)
        row = np.asarray(got)[0, :, 0].astype(int)
        assert row[0] <= 1 and row[-1] >= 254 and np.all(np.diff(row) >= 0)


PEAK_PROBE = """\
import re, sys
from qwen_image_lora import images
data = open(sys.argv[1], 'rb').read()
peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024
before = peak()
cost = images.decode_cost(data, 2048).bytes
image = images.decode_image(data, max_side=2048)
print(image.size[0], image.size[1], peak() - before, cost)
"""


# name -> (the 6144x6144 frame from a black disc on white in mode L, format, save options): tiny files, big frames
LARGE = {
    "8-bit grey PNG": (lambda im: im, "PNG", {}),
    "JPEG": (lambda im: im.convert("RGB"), "JPEG", {"quality": 90}),
    "1-bit PNG": (lambda im: im.convert("1"), "PNG", {}),
    "palette+tRNS PNG": (lambda im: im.convert("P"), "PNG", {"transparency": 255}),
    "16-bit grey PNG": (lambda im: im.convert("I").point(lambda v: v * 257).convert("I;16"), "PNG", {}),
    "lossless WebP": (lambda im: im.convert("RGB"), "WEBP", {"lossless": True}),
}


@pytest.mark.parametrize("name", list(LARGE))
def test_a_decode_holds_no_more_than_its_counted_cost(tmp_path, name):
    """Peak RSS of one 6144x6144 decode to 2048, in a fresh process (PIL allocates in C, out of tracemalloc's sight).
    Before: the 1-bit, palette and 16-bit frames were converted to RGB(A) or floats at full size before the resize
    (8000x8000: +325, +569 and +673 MB where these costs say 129, 188 and 222 MB)."""
    convert, fmt, options = LARGE[name]
    image = Image.new("L", (6144, 6144), 255)
    ImageDraw.Draw(image).ellipse((1536, 1536, 4608, 4608), fill=0)
    path = tmp_path / f"big.{fmt.lower()}"
    convert(image).save(path, fmt, **options)
    del image
    assert path.stat().st_size < 2_000_000  # a small upload, well under any body limit
    out = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    w, h, peak, cost = map(int, out.stdout.split())
    assert (w, h) == (2048, 2048)
    assert peak <= cost, f"{name}: decode peak {peak / 2**20:.0f} MiB over its counted cost {cost / 2**20:.0f} MiB"


def test_an_exif_rotated_photo_reads_the_same_in_training_validation_eval_and_inference(tmp_path):
    photo = Image.new("RGB", (48, 24), "white")
    photo.paste((255, 0, 0), (0, 0, 8, 8))  # a red corner: where it lands shows the orientation
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; shown turned 90 degrees clockwise
    photo.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    cfg = Config()
    cfg.validation.edits = [EditExample(images=[str(tmp_path / "phone.jpg")], prompt="put it on a table")]
    reads = {
        "training": open_image(tmp_path / "phone.jpg"),
        "validation": validation_requests(cfg)["edit_00"].images[0],
        "eval": edit_sources(cfg.validation.edits[0])[0],  # was read without EXIF: 48x24, the red corner top-left
        "inference": images.load_image(tmp_path / "phone.jpg"),
    }
    for where, image in reads.items():
        pixels = np.asarray(image.convert("RGB"), int)
        assert image.size == (24, 48), where
        assert pixels[:8, -8:, 0].mean() > 200 and pixels[:8, -8:, 1].mean() < 60, where  # red corner now top-right
        assert np.array_equal(pixels, np.asarray(reads["inference"], int)), where


def test_inference_inputs_are_jpeg_png_or_webp_whatever_their_name(tmp_path):
    Image.new("P", (32, 32)).save(tmp_path / "a.png", format="GIF")
    with pytest.raises(ImageInputError, match=r"a\.png: a GIF image, not JPEG, PNG or WebP") as e:
        images.load_image(tmp_path / "a.png")
    assert e.value.code == "unsupported-format" and not e.value.too_large
    assert read_image(tmp_path / "a.png", formats=None).size == (32, 32)  # training data reads it (the doctor warns)


def test_a_phone_jpeg_with_a_gain_map_reads_as_its_photo_everywhere(tmp_path):
    """Ultra HDR / gain-map JPEGs open in PIL as MPO: training took them, inference refused them as 'a MPO image'."""
    photo, gain_map = Image.new("RGB", (48, 32), (200, 30, 40)), Image.new("RGB", (24, 16), (9, 9, 9))
    photo.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[gain_map])
    with Image.open(tmp_path / "phone.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2
    for image in (
        images.load_image(tmp_path / "phone.jpg"),
        images.decode_image((tmp_path / "phone.jpg").read_bytes()),
    ):
        assert image.size == (48, 32) and np.abs(np.asarray(image, dtype=int) - (200, 30, 40)).max() <= 3


def test_jpeg_outputs_keep_full_colour_resolution():
    """PIL's default 4:2:0 halves colour resolution: a masked edit's kept pixels moved by up to 24 in a JPEG."""
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = (220, 20, 60)  # one-pixel colour stripes: what 4:2:0 smears
    with Image.open(io.BytesIO(images.encode_image(Image.fromarray(stripes), "JPEG", quality=95))) as im:
        assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4
        assert np.abs(np.asarray(im, dtype=int) - stripes).max() <= 16  # 4:2:0 gives ~110


# ------------------------------------------------------------------------------------------ admission by cost


def _until(condition) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_decodes_are_admitted_by_cost_in_arrival_order_and_one_over_the_budget_is_refused():
    mb = 2**20
    gate = DecodeGate(limit=4, budget=100 * mb)
    with pytest.raises(ImageInputError, match=r"8000x8000 WEBP \(RGB\) image takes about 101 MB, over the service's "
                                              r"decode budget of 100 MB") as e:  # fmt: skip
        with gate(DecodeCost(101 * mb, "8000x8000 WEBP (RGB)")):
            pass
    assert e.value.too_large and gate.active == gate.waiting == 0
    order, leave_a = [], threading.Event()

    def decode(name, cost, leave=None):
        with gate(DecodeCost(cost * mb, name)):
            order.append(name)
            if leave is not None:
                leave.wait(10)

    threads = [threading.Thread(target=decode, args=("a", 60, leave_a))]
    threads[0].start()
    _until(lambda: gate.active == 1)
    threads.append(threading.Thread(target=decode, args=("b", 60)))  # does not fit beside a
    threads[1].start()
    _until(lambda: gate.waiting == 1)
    threads.append(threading.Thread(target=decode, args=("c", 10)))  # would fit beside a, but b came first
    threads[2].start()
    _until(lambda: gate.waiting == 2)
    time.sleep(0.1)
    assert order == ["a"] and gate.held == 60 * mb
    leave_a.set()
    for t in threads:
        t.join(10)
    assert order == ["a", "b", "c"] and gate.active == gate.held == 0


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)


def test_a_webp_whose_decode_would_overrun_the_budget_gets_413_naming_it(tiny_model_dir, gen):
    """Issue #24: 32 edits of a 3 KB lossless WebP of 8000x8000 took the server from 961 to 3,416 MB (PIL's WebP
    decoder holds ~16 bytes a pixel). Its cost is counted from the header and refused before a pixel is decoded."""
    cfg = Config()
    cfg.model.pretrained, cfg.data.resolution, cfg.serve.max_steps = str(tiny_model_dir), 64, 2
    big = Image.new("RGB", (6000, 6000), "white")
    ImageDraw.Draw(big).ellipse((1500, 1500, 4500, 4500), fill="black")
    data = _encode(big, "WEBP", lossless=True)
    assert len(data) < 50_000 and decode_cost(data).bytes > DecodeGate(1).budget
    body = {"prompt": "put it on white", "image": base64.b64encode(data).decode(), "num_inference_steps": 1}
    with TestClient(create_app(cfg, [KEY], generator=gen)) as client:
        r = client.post("/v1/images", json=body, headers={"x-api-key": KEY})
    assert r.status_code == 413, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "image"] and re.search(r"6000x6000 WEBP .* decode budget of 512 MB", detail["msg"])
