"""The one image reader (`qwen_image_lora/images.py`): a large input of every accepted format reads as PIL's own full
decode and resize would give it, without full-size copies in another mode (peak memory measured in a fresh process,
within what `decode_cost` counts); EXIF orientation is the same in training, validation, eval and inference; and the
service admits decodes by that cost (issues #24 and #25)."""

import base64
import io
import os
import re
import struct
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, JpegImagePlugin, PngImagePlugin

from qwen_image_lora import image_files, images
from qwen_image_lora.config import Config, DataConfig
from qwen_image_lora.data.dataset import pixel_spec
from qwen_image_lora.data.sources import open_image
from qwen_image_lora.eval.evaluator import _mask as evaluator_mask
from qwen_image_lora.eval.evaluator import edit_sources
from qwen_image_lora.eval_config import EditExample
from qwen_image_lora.images import DecodeCost, ImageInputError, decode_cost, read_image, to_8bit
from qwen_image_lora.inference.batch import _request as batch_request
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.guards import DecodeGate
from qwen_image_lora.inference.jobs import Job
from qwen_image_lora.inference.server import _decode_inputs, create_app
from qwen_image_lora.serve_config import ServeConfig
from qwen_image_lora.train.validation import validation_requests

KEY = "images-key-0123456789"


def _linear_srgb_icc() -> bytes:
    """A minimal ICC v2 display profile: sRGB's primaries (D50-adapted) with a linear tone curve (gamma 1.0). Its
    mid grey 128 is sRGB 188 (the sRGB curve at 128/255), a number that does not come from the code under test."""

    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    text = b"linear sRGB test\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0100) + bytes(2)  # one entry: gamma 1.0 (u8Fixed8)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]  # fmt: skip
    return _icc(b"mntrRGB XYZ ", tags)


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _icc(kind: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v2 profile of `kind` (device class, colour space, PCS) holding `tags`, D50 illuminant."""
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + kind + bytes(12)
              + b"acsp" + bytes(24) + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(48))  # fmt: skip
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def _cmyk_icc() -> bytes:
    """A minimal ICC v2 CMYK printer profile whose cyan ink prints sRGB red (Lab 53.2, 80.1, 67.2): a number that no
    CMYK conversion ignoring the profile gives. A2B0 is a two-point lut16 from CMYK to Lab; no ink is white, any K
    black, other mixes mid grey."""

    def lab(c, m, y, k):
        L, a, b = (0, 0, 0) if k else (53.24, 80.09, 67.2) if (c, m, y) == (1, 0, 0) else (100, 0, 0) if not (
            c or m or y) else (50, 0, 0)  # fmt: skip
        return struct.pack(">3H", round(L / 100 * 0xFF00), round((a + 128) * 256), round((b + 128) * 256))

    corners = b"".join(lab(c, m, y, k) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1))
    identity = b"".join(_s15(float(i == j)) for i in range(3) for j in range(3))
    ramp = struct.pack(">2H", 0, 0xFFFF)
    a2b0 = (
        b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + identity + struct.pack(">2H", 2, 2) + ramp * 4 + corners + ramp * 3
    )
    text = b"cyan prints red\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    white = b"XYZ " + bytes(4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    return _icc(b"prtrCMYKLab ", [(b"desc", desc), (b"wtpt", white), (b"A2B0", a2b0)])


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
    "JPEG in another profile": (
        lambda im: im.convert("RGB"),
        "JPEG",
        {"quality": 90, "icc_profile": _linear_srgb_icc()},
    ),
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


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_that_needs_no_shrinking_holds_no_more_than_its_counted_cost(tmp_path, fmt, orientation):
    """At full size the turned copy was not counted (a 2048x2000 photo with EXIF orientation 6 peaked at 50 MB
    against a cost of 33 MB), nor the decoder's own buffers (0.6 MB over, unturned)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.merge("RGB", [Image.effect_noise((2048, 2000), 60).convert("L")] * 3)
    path = tmp_path / f"turned.{fmt.lower()}"
    image.save(path, fmt, exif=exif.tobytes())
    out = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    w, h, peak, cost = map(int, out.stdout.split())
    assert (w, h) == ((2000, 2048) if orientation == 6 else (2048, 2000))
    assert peak <= cost, f"decode peak {peak / 2**20:.0f} MiB over its counted cost {cost / 2**20:.0f} MiB"


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
    with Image.open(io.BytesIO(image_files.encode_image(Image.fromarray(stripes), "JPEG", quality=95))) as im:
        assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4
        assert np.abs(np.asarray(im, dtype=int) - stripes).max() <= 16  # 4:2:0 gives ~110


def _srgb(value: int) -> int:
    """A linear 8-bit value in sRGB's encoding, by the sRGB formula."""
    v = value / 255
    return round(255 * (12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055))


def test_a_file_in_another_colour_profile_reads_as_srgb_everywhere(tmp_path):
    """A Display P3 phone photo or an Adobe RGB export was read as if its numbers were sRGB: every colour shifted (here
    a linear-light profile, whose 128 is sRGB's 188)."""
    icc = _linear_srgb_icc()
    want = [_srgb(v) for v in (128, 64, 255)]
    Image.new("RGB", (64, 48), (128, 64, 255)).save(tmp_path / "photo.png", icc_profile=icc)
    Image.new("RGBA", (64, 48), (128, 64, 255, 77)).save(tmp_path / "cutout.png", icc_profile=icc)
    Image.new("RGB", (5000, 40), (128, 64, 255)).save(tmp_path / "wide.jpg", quality=100, icc_profile=icc)
    reads = {
        "inference": images.load_image(tmp_path / "photo.png"),
        "upload": images.decode_image((tmp_path / "photo.png").read_bytes()),
        "training": open_image(tmp_path / "photo.png"),
        "alpha kept": open_image(tmp_path / "cutout.png", alpha="keep"),
        "shrunk JPEG": images.load_image(tmp_path / "wide.jpg"),
    }
    for name, image in reads.items():
        pixel = np.asarray(image)[20, 20]
        assert np.abs(pixel[:3].astype(int) - want).max() <= 1, (name, pixel, want)
        assert "icc_profile" not in image.info  # its pixels are sRGB now: nothing may write the old profile again
    assert np.asarray(reads["alpha kept"])[20, 20, 3] == 77  # alpha is not a colour
    assert reads["shrunk JPEG"].size == (4096, 33)  # a file is read up to 4096 px


def test_a_cmyk_print_file_reads_through_its_profile(tmp_path):
    """A print asset's CMYK JPEG carries the profile of its press; PIL's own CMYK -> RGB ignores it (cyan here read as
    (0, 255, 255) where its press prints red). An untagged CMYK file keeps PIL's conversion."""
    Image.new("CMYK", (64, 48), (255, 0, 0, 0)).save(tmp_path / "print.jpg", quality=100, icc_profile=_cmyk_icc())
    Image.new("CMYK", (5000, 40), (255, 0, 0, 0)).save(tmp_path / "wide.jpg", quality=100, icc_profile=_cmyk_icc())
    Image.new("CMYK", (64, 48), (255, 0, 0, 0)).save(tmp_path / "untagged.jpg", quality=100)
    reads = {
        "inference": images.load_image(tmp_path / "print.jpg"),
        "upload": images.decode_image((tmp_path / "print.jpg").read_bytes()),
        "training": open_image(tmp_path / "print.jpg"),
        "shrunk": images.load_image(tmp_path / "wide.jpg"),  # converted strip by strip
    }
    for name, image in reads.items():
        assert image.mode == "RGB" and "icc_profile" not in image.info, name
        assert np.abs(np.asarray(image)[20, 20].astype(int) - (255, 0, 0)).max() <= 8, (name, image.getpixel((20, 20)))
    assert reads["shrunk"].size == (4096, 33)
    assert tuple(np.asarray(images.load_image(tmp_path / "untagged.jpg"))[20, 20]) == (0, 255, 255)
    # The data cache keys the converted file's latents apart from the naive read's.
    assert images.converts_colours(tmp_path / "print.jpg") and not images.converts_colours(tmp_path / "untagged.jpg")


def test_srgb_untagged_and_damaged_profiles_read_as_their_numbers(tmp_path):
    """A profile littlecms parses but cannot build a transform from (cut short, or of the abstract class) refused the
    whole image as corrupt."""
    scene, linear = _scene(64, 48), _linear_srgb_icc()
    abstract = linear[:12] + b"abst" + linear[16:]
    for name, options in {
        "untagged": {},
        "sRGB": {"icc_profile": image_files.SRGB_ICC},
        "damaged": {"icc_profile": b"x" * 200},
        "cut short": {"icc_profile": linear[:-10]},
        "abstract": {"icc_profile": abstract},
    }.items():
        scene.save(tmp_path / f"{name}.png", **options)
        assert np.array_equal(np.asarray(read_image(tmp_path / f"{name}.png")), np.asarray(scene)), name
        assert not images.converts_colours(tmp_path / f"{name}.png"), name


def test_a_mask_is_read_as_its_numbers_wherever_it_comes_in(tmp_path):
    """A mask is coverage, not colour: a tagged mask's soft edge moved (64 -> 137) while its photo was converted."""
    icc = _linear_srgb_icc()
    ramp = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    ramp.save(tmp_path / "mask.png", icc_profile=icc)
    Image.new("RGB", (64, 64), (128, 64, 255)).save(tmp_path / "photo.png", icc_profile=icc)
    encoded = {name: base64.b64encode((tmp_path / f"{name}.png").read_bytes()).decode() for name in ("photo", "mask")}
    served = _decode_inputs(
        SimpleNamespace(image=encoded["photo"], mask=encoded["mask"]), ServeConfig(), DecodeGate(limit=2)
    )
    job = Job(prompt="x", images=[str(tmp_path / "photo.png")], mask=str(tmp_path / "mask.png"))
    edit = EditExample(images=[str(tmp_path / "photo.png")], prompt="x", mask=str(tmp_path / "mask.png"))
    masks = {
        "reader": read_image(tmp_path / "mask.png", colours=False),
        "serve": served.mask,
        "batch": batch_request(job, 0, {}).mask,
        "eval": evaluator_mask(edit, served.images[0]),
    }
    for name, mask in masks.items():
        assert np.array_equal(np.asarray(mask.convert("L")), np.asarray(ramp.convert("L"))), name
    assert tuple(np.asarray(served.images[0])[5, 5]) == (188, 137, 255)  # the photo itself is converted


def test_whether_a_file_converts_is_asked_again_when_the_file_changes(tmp_path):
    """Training asks per sample, memoised on the file's path, size and time: a replaced file is read again."""
    path, pixels = tmp_path / "a.png", Image.new("RGB", (8, 8), (1, 2, 3))
    pixels.save(path, icc_profile=_linear_srgb_icc())
    tagged = path.stat()
    assert images.converts_colours(path)
    plain = io.BytesIO()
    pixels.save(plain, "PNG")
    padding = PngImagePlugin.PngInfo()  # untagged, and padded to the tagged file's size (a tEXt chunk: 16 + text)
    padding.add_text("pad", "x" * (tagged.st_size - len(plain.getvalue()) - 16))
    pixels.save(path, pnginfo=padding)
    assert path.stat().st_size == tagged.st_size
    os.utime(path, ns=(tagged.st_atime_ns, tagged.st_mtime_ns + 10**9))
    assert not images.converts_colours(path)
    Image.new("RGB", (80, 8)).save(path, icc_profile=_linear_srgb_icc())  # another size at the same time
    os.utime(path, ns=(tagged.st_atime_ns, tagged.st_mtime_ns + 10**9))
    assert images.converts_colours(path)


def test_written_images_are_tagged_srgb_whatever_profile_their_input_carried():
    """A masked edit's PNG carried the input's profile (PIL writes `image.info`'s) over pixels that are sRGB."""
    image = _scene(32, 32)
    image.info["icc_profile"] = _linear_srgb_icc()
    for fmt in ("PNG", "JPEG", "WEBP"):
        with Image.open(io.BytesIO(image_files.encode_image(image, fmt))) as written:
            assert written.info.get("icc_profile") == image_files.SRGB_ICC, fmt
            if fmt == "PNG":  # and it reads back as written
                assert np.array_equal(
                    np.asarray(read_image(io.BytesIO(image_files.encode_image(image)).getvalue())), np.asarray(image)
                )


def test_the_srgb_tag_is_the_same_bytes_in_every_process():
    """littlecms stamps the time into the profile it builds: each run's outputs differed in those bytes."""
    probe = "import sys, time; time.sleep(1.1); from qwen_image_lora import image_files; sys.stdout.write(image_files.SRGB_ICC.hex())"
    other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert bytes.fromhex(other.stdout) == image_files.SRGB_ICC


def test_a_converted_files_latents_are_cached_apart_and_others_keep_their_keys(tmp_path):
    data = DataConfig()
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    Image.new("RGBA", (8, 8)).save(tmp_path / "alpha.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "p3.png", icc_profile=_linear_srgb_icc())
    Image.new("RGBA", (8, 8)).save(tmp_path / "p3alpha.png", icc_profile=_linear_srgb_icc())
    keep = DataConfig(alpha="keep")
    assert [pixel_spec(data, tmp_path / "plain.png"), pixel_spec(keep, tmp_path / "alpha.png")] == ["", "alpha=keep"]
    assert pixel_spec(data, tmp_path / "p3.png") == "colour=srgb"
    assert pixel_spec(keep, tmp_path / "p3alpha.png") == "alpha=keep;colour=srgb"


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


def test_an_animated_input_is_refused_naming_its_frames_and_a_phones_mpo_is_read():
    """An animated WebP or PNG edited its first frame without a word, where a GIF is refused; an MPO (a photo with
    a gain map or depth frame after it) is one picture and reads."""
    first, second = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    for fmt in ("WEBP", "PNG"):
        buf = io.BytesIO()
        first.save(buf, fmt, save_all=True, append_images=[second])
        with pytest.raises(images.ImageInputError) as refused:
            images.decode_image(buf.getvalue())
        assert str(refused.value) == f"an animated {fmt} (2 frames): save the frame you mean as a still PNG or JPEG"
        assert refused.value.code == "animated"
        red, _, blue = images.read_image(buf.getvalue(), formats=None).getpixel((0, 0))  # training: frame 1
        assert red > 250 and blue < 8
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    red, _, blue = images.decode_image(buf.getvalue()).getpixel((0, 0))
    assert red > 250 and blue < 8
