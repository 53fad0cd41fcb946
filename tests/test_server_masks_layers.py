"""Masked edits and layered output through the HTTP API: same auth, limits and queue as /v1/images."""

import base64
import io
import logging
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from psd_tools import PSDImage

from qwen_image_lora.config import Config
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.layers import MAX_ELEMENTS, Element, LayersError, check_request
from qwen_image_lora.inference.server import _warning_header, create_app
from qwen_image_lora.knobs import GUIDANCE_UNUSED, NEGATIVE_UNUSED

KEY = "mask-key-0123456789"
W, H = 96, 64


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    gen = Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)
    cfg = Config()
    cfg.model.pretrained = str(tiny_model_dir)
    cfg.serve.max_steps, cfg.serve.max_queue = 4, 2
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        yield c


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def product() -> Image.Image:
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB")


def half_mask(value=255) -> Image.Image:
    mask = Image.new("L", (W, H), 0)
    mask.paste(value, (W // 2, 0, W, H))
    return mask


def post(client, path, body, key=KEY):
    return client.post(path, json=body, headers={"x-api-key": key})


def test_masked_edit_keeps_every_black_pixel(client):
    image, mask = product(), half_mask()
    r = post(
        client,
        "/v1/images",
        {
            "prompt": "on marble",
            "image": b64(image),
            "mask": b64(mask),
            "mask_feather": 2,
            "num_inference_steps": 2,
            "seed": 3,
        },
    )
    assert r.status_code == 200, r.text
    out = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    kept = np.asarray(mask) < 128
    assert out.shape[:2] == (H, W) and np.array_equal(out[kept], np.asarray(image)[kept])
    assert np.abs(out[~kept].astype(int) - np.asarray(image)[~kept]).mean() > 5


def test_a_white_mask_is_said_once_per_request_and_a_masked_edit_takes_no_size(client, caplog):
    """The worker checked each request, then `generate` checked it again: the line came twice per request."""
    body = {"prompt": "x", "image": b64(product()), "mask": b64(Image.new("L", (W, H), 255)), "num_inference_steps": 1}
    with caplog.at_level(logging.WARNING):
        said = post(client, "/v1/images", body)
    assert said.status_code == 200 and caplog.text.count("white everywhere, so this is a plain edit") == 1
    # ... and to the client, which got a 200 and no hint (the line went to the service's console alone)
    assert said.headers["x-warning"] == "mask: white everywhere, so this is a plain edit (nothing is kept)"
    as_json = post(client, "/v1/images", {**body, "response_format": "b64_json"}).json()
    assert as_json["data"][0]["warnings"] == ["mask: white everywhere, so this is a plain edit (nothing is kept)"]
    plain = post(client, "/v1/images", {**body, "mask": b64(half_mask())})
    assert plain.status_code == 200 and "x-warning" not in plain.headers
    r = post(client, "/v1/images", {**body, "aspect_ratio": "16:9"})  # was taken, recorded and ignored
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask"], r.text


def test_a_guidance_scale_without_a_negative_prompt_is_said_to_the_client(client):
    """Guidance acts only against a negative prompt: the CLI said so, while a client got a 200 and no hint."""
    body = {"prompt": "x", "num_inference_steps": 1, "width": 64, "height": 64, "guidance_scale": 5.0}
    said = post(client, "/v1/images", body)
    assert said.status_code == 200 and said.headers["x-warning"] == f"{GUIDANCE_UNUSED}; rendered without guidance"
    acted = post(client, "/v1/images", {**body, "negative_prompt": "blur"})
    assert acted.status_code == 200 and "x-warning" not in acted.headers
    for scale in (None, 0.5):  # the other way round: a negative prompt with no guidance was a 200 and no hint
        alone = {**body, "negative_prompt": "blur", "guidance_scale": scale, "response_format": "b64_json"}
        said = post(client, "/v1/images", {k: v for k, v in alone.items() if v is not None})
        assert said.headers["x-warning"] == f"{NEGATIVE_UNUSED}; rendered without it"
        assert said.json()["data"][0]["settings"]["negative_prompt"] is None  # the record holds what acted


def test_a_quality_for_a_png_or_a_feather_without_a_mask_is_said_to_the_client(client):
    """Both did nothing and were recorded in the image's settings without a word, while the CLI gave a note for each."""
    body = {"prompt": "x", "num_inference_steps": 1, "width": 64, "height": 64, "response_format": "b64_json"}
    said = post(client, "/v1/images", {**body, "quality": 5, "mask_feather": 64})
    warnings = [
        "quality applies to JPEG and WebP outputs; a PNG is lossless",
        "mask_feather applies only to a masked edit (with a mask)",
    ]
    assert said.status_code == 200 and said.json()["data"][0]["warnings"] == warnings
    assert said.headers["x-warning"] == "; ".join(warnings)
    acted = post(client, "/v1/images", {**body, "quality": 5, "output_format": "webp"})
    assert acted.status_code == 200 and "x-warning" not in acted.headers


@pytest.mark.parametrize("body, field, message", [
    ({"mask": "black"}, "mask", "changes nothing"),
    ({"mask": "distorted"}, "mask", "aspect ratio"),
    ({"mask": "not-base64!"}, "mask", "not valid base64"),
    ({"image": None}, "mask", "needs an image"),
    ({"mask": "auto"}, "mask", "'auto' is for /v1/layers"),  # was silently ignored: a plain edit
])  # fmt: skip
def test_bad_masks_get_422_naming_the_mask(client, body, field, message):
    masks = {"black": b64(Image.new("L", (W, H), 0)), "distorted": b64(Image.new("L", (50, 50), 255))}
    request = {"prompt": "x", "image": b64(product()), "mask": b64(half_mask()), "num_inference_steps": 1, **body}
    request["mask"] = masks.get(request["mask"], request["mask"])
    r = post(client, "/v1/images", {k: v for k, v in request.items() if v is not None})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][-1] == field and message in detail["msg"] and not detail["msg"].startswith("Value error")


@pytest.mark.parametrize("path", ["/v1/images", "/v1/layers"])
def test_a_mask_of_another_aspect_is_named_at_the_sizes_sent_not_the_downscaled_ones(tiny_model_dir, path):
    """Under serve.max_side, a 192x64 mask for a 96x64 image was refused as "mask: 64x21 ... (64x43)": sizes the
    client never sent."""
    cfg = Config()
    cfg.model.pretrained, cfg.serve.max_side = str(tiny_model_dir), 64
    gen = Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)
    with TestClient(create_app(cfg, [KEY], generator=gen)) as small:
        body = {"prompt": "x", "image": b64(product()), "mask": b64(Image.new("L", (2 * W, H), 255))}
        r = post(small, path, body)
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"][-1] == "mask" and detail["msg"].startswith(
        f"mask: {2 * W}x{H} has another aspect ratio than the image ({W}x{H})"
    )


def test_layers_endpoint_returns_a_psd_with_the_named_layers(client):
    subject = Image.new("L", (W, H), 0)
    subject.paste(255, (20, 10, 70, 50))
    body = {
        "image": b64(product()),
        "mask": b64(subject),
        "prompt": "a marble table",
        "num_inference_steps": 1,
        "elements": [{"prompt": "a SALE badge", "x": 4, "y": 4, "width": 32, "height": 16}],
        "seed": 1,
    }
    jobs_before = _layer_jobs(client)
    r = post(client, "/v1/layers", body)
    assert r.status_code == 200, r.text
    assert _layer_jobs(client) == jobs_before + 1  # /metrics saw only /v1/images' renders
    assert r.headers["content-type"] == "image/vnd.adobe.photoshop" and r.headers["x-seed"] == "1"
    assert r.headers["content-disposition"] == 'attachment; filename="layers-1.psd"'
    psd = PSDImage.open(io.BytesIO(r.content))
    assert [layer.name for layer in psd][:2] == ["background", "subject"] and psd.size == (W, H)
    zipped = post(client, "/v1/layers", {**body, "output_format": "zip", "guidance_scale": 5.0})
    assert zipped.status_code == 200 and zipped.content[:2] == b"PK"
    # said once, though the background and the element each rendered with it
    assert zipped.headers["x-warning"] == f"{GUIDANCE_UNUSED}; rendered without guidance"


def _layer_jobs(client) -> float:
    found = re.search(r"^qwen_lora_layers_seconds_count (\S+)$", client.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_layers_has_the_same_auth_and_limits(client):
    body = {"image": b64(product()), "mask": b64(half_mask()), "num_inference_steps": 1}
    assert post(client, "/v1/layers", body, key="wrong").status_code == 401
    assert post(client, "/v1/layers", {**body, "num_inference_steps": 99}).status_code == 422
    inside, outside = {"prompt": "a", "x": 0, "y": 0, "width": 8, "height": 8}, {"prompt": "b", "x": 90, "y": 0,
                                                                                "width": 32, "height": 8}  # fmt: skip
    bad_box = post(client, "/v1/layers", {**body, "elements": [inside, outside]})
    assert bad_box.status_code == 422 and bad_box.json()["detail"][0]["loc"] == ["body", "elements", 1]
    assert post(client, "/v1/layers", {**body, "mask": b64(Image.new("L", (W, H), 0))}).status_code == 422
    nine = post(client, "/v1/layers", {**body, "elements": [inside] * (MAX_ELEMENTS + 1)})
    assert nine.status_code == 422 and nine.json()["detail"][0]["loc"] == ["body", "elements"]
    with pytest.raises(LayersError, match=rf"^element: at most {MAX_ELEMENTS} elements \(got {MAX_ELEMENTS + 1}\)"):
        check_request(product(), half_mask(), [Element("a", (0, 0, 8, 8))] * (MAX_ELEMENTS + 1))  # the CLI took 9


@pytest.mark.parametrize("path", ["/v1/images", "/v1/layers"])
def test_an_input_too_elongated_to_resize_gets_422_naming_the_image_and_the_limit(client, path):
    """At resolution 64 the pipeline's sizing rule gives an aspect of 16:1 or more a 0 px side (was a 500 with a
    PIL traceback from /v1/images, a bare 'height and width must be > 0' from /v1/layers)."""
    body = {"image": b64(Image.new("RGB", (400, 4), "white")), "prompt": "a marble table", "num_inference_steps": 1}
    r = post(client, path, {**body, "mask": "auto"} if path == "/v1/layers" else body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "image"], detail
    assert "400x4" in detail["msg"] and "under 16:1" in detail["msg"], detail["msg"]
    if path == "/v1/images":  # given as a list, the loc names the item (it said "image 2" in the message alone)
        r = post(client, path, {**body, "image": [b64(Image.new("RGB", (64, 64))), body["image"]]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image", 1], r.text


def test_a_warning_header_is_one_latin_1_line_whatever_the_message_holds():
    """A line break in a warning would end the header (h11 refuses it: a 500), and non-latin-1 text cannot be sent."""
    assert _warning_header([]) == {}
    assert _warning_header(["a\r\nX-Evil: 1", "ü 中\x00"]) == {"x-warning": "a X-Evil: 1; ü ? "}
