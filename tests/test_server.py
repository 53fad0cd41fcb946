"""The HTTP service on the tiny model: edits, auth, limits, SSRF refusals, a full queue, metrics."""

import asyncio
import base64
import contextlib
import copy
import dataclasses
import gzip
import hashlib
import http.server
import io
import ipaddress
import itertools
import json
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from qwen_image_lora.config import Config
from qwen_image_lora.image_files import read_settings
from qwen_image_lora.images import decode_image
from qwen_image_lora.inference import urls
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.guards import KeyCheck
from qwen_image_lora.inference.server import create_app
from qwen_image_lora.inference.service import make_server
from qwen_image_lora.inference.testing import make_random_lora
from qwen_image_lora.inference.urls import URLRefused, fetch, refusal_reason, resolve_checked
from qwen_image_lora.serve_config import ServeAdapter, load_api_keys
from tests.launch import running

KEY = "test-key-0123456789"
AUTH = {"x-api-key": KEY}


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)


@pytest.fixture(scope="module")
def cfg(gen, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = Config()
    cfg.model.pretrained = str(tiny_model_dir)
    cfg.serve.adapters = [
        ServeAdapter("brand", str(make_random_lora(gen.pipe.transformer, root / "brand", seed=5)), 0.8),
        ServeAdapter("sketch", str(make_random_lora(gen.pipe.transformer, root / "sketch", seed=6)), 1.0),
    ]
    cfg.data.resolution = 64
    cfg.serve.max_steps = 4
    cfg.serve.max_side = 256
    cfg.serve.max_body_mb = 0.25
    cfg.serve.max_queue = 2
    return cfg


@pytest.fixture(scope="module")
def client(cfg, gen):
    with TestClient(create_app(cfg, [KEY, "second-key"], generator=gen)) as c:
        yield c


def b64_png(w=80, h=48, seed=0, mode="RGB"):
    arr = np.random.RandomState(seed).randint(0, 255, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def edit(**kw):
    return {"image": b64_png(), "prompt": "put it on marble", "num_inference_steps": 1, "seed": 1, **kw}


def asgi_post(app, headers, body: bytes, path="/v1/images"):
    """POST straight through the ASGI interface, with exactly these header bytes (an HTTP client would trim padding
    off a header value; a server behind a proxy may not). Returns (status, response body)."""
    sent, answered = [], None
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():  # like a server: after the body, nothing until the client leaves (here: once answered)
        if chunks:
            return chunks.pop()
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}  # fmt: skip

    async def call():
        nonlocal answered
        answered = asyncio.Event()
        await app(scope, receive, send)

    asyncio.run(call())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_valid_edit_returns_a_decodable_image_at_the_input_size(client):
    r = client.post("/v1/images", json=edit(), headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "1"
    image = Image.open(io.BytesIO(r.content))
    assert image.size == (80, 48) and image.mode == "RGBA"
    assert r.headers["content-disposition"] == 'inline; filename="qwen-image-1.png"'  # `curl -OJ` had no name
    jpg = client.post("/v1/images", json=edit(output_format="jpg"), headers=AUTH)  # the CLI's spelling: was a 422
    assert jpg.status_code == 200 and Image.open(io.BytesIO(jpg.content)).format == "JPEG"
    assert jpg.headers["content-disposition"].endswith('filename="qwen-image-1.jpg"')

    r = client.post("/v1/images", json=edit(output_format="jpeg", response_format="b64_json", quality=70), headers=AUTH)
    assert r.status_code == 200 and r.json()["output_format"] == "jpeg"
    data = base64.b64decode(r.json()["data"][0]["b64_json"])
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "RGB"
    # the image says how it was made, as the JSON beside it does; the input is known by its bytes' sha256
    settings = r.json()["data"][0]["settings"]
    assert read_settings(data) == settings and settings["seed"] == 1 and settings["prompt"] == "put it on marble"
    assert settings["images"] == [{"sha256": hashlib.sha256(base64.b64decode(b64_png())).hexdigest(), "path": None}]
    assert [(a["name"], a["weight"], a["path"]) for a in settings["loras"]] == [
        ("brand", 0.8, None),
        ("sketch", 1.0, None),
    ]


def test_text_to_image_with_aspect_ratio_and_per_request_adapters(client):
    def get(**kw):
        r = client.post(
            "/v1/images", json={"prompt": "a bottle", "num_inference_steps": 1, "seed": 3, **kw}, headers=AUTH
        )
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(r.content))).astype(int)

    base = get(loras=[], aspect_ratio="16:9")
    assert base.shape[1] > base.shape[0]
    brand = get(loras=[{"name": "brand"}], aspect_ratio="16:9")
    assert np.abs(brand - base).mean() > 0.5
    assert np.array_equal(get(loras=[], aspect_ratio="16:9"), base)  # nothing carried over from the last request
    assert np.array_equal(
        get(aspect_ratio="16:9"), get(loras=[{"name": "brand", "weight": 0.8}, {"name": "sketch"}], aspect_ratio="16:9")
    )
    # a batch line's mapping form, which the API refused with a 422
    assert np.array_equal(get(loras={"brand": 0.8, "sketch": None}, aspect_ratio="16:9"), get(aspect_ratio="16:9"))
    bad = client.post("/v1/images", json={"prompt": "x", "loras": {"brand": 5}}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "loras", 0, "weight"], bad.text


def test_auth_401_without_or_with_a_wrong_key(client):
    assert client.post("/v1/images", json=edit()).status_code == 401
    assert client.post("/v1/images", json=edit(), headers={"x-api-key": "nope"}).status_code == 401
    assert client.post("/v1/images", json=edit(), headers={"x-api-key": ""}).status_code == 401
    assert client.post("/v1/images", json=edit(), headers={"x-api-key": "second-key"}).status_code == 200


@pytest.mark.parametrize("presented", [KEY[:1], KEY[:-1], KEY + "0", "x" + KEY, KEY.upper(), KEY.title(), " " + KEY,
                                       KEY + " ", KEY + "\t", "second-key" + KEY, KEY + ",second-key"])  # fmt: skip
def test_near_miss_keys_get_401(client, presented):
    """A prefix, an extension, another case or padding of a valid key is a different key."""
    status, _ = asgi_post(client.app, [(b"x-api-key", presented.encode())], json.dumps(edit()).encode())
    assert status == 401
    assert asgi_post(client.app, [(b"x-api-key", KEY.encode())], json.dumps(edit()).encode())[0] == 200


def test_two_key_headers_get_401(client):
    status, _ = asgi_post(
        client.app, [(b"x-api-key", b"nope"), (b"x-api-key", KEY.encode())], json.dumps(edit()).encode()
    )
    assert status == 401


@pytest.mark.parametrize("headers, status", [
    ([(b"authorization", f"Bearer {KEY}".encode())], 200),  # what OpenAI-style clients send: it was refused
    ([(b"authorization", f"bearer {KEY}".encode())], 200),
    ([(b"authorization", b"Bearer nope")], 401),
    ([(b"authorization", f"Bearer {KEY} ".encode())], 401),  # near misses, as for x-api-key
    ([(b"authorization", f"Basic {KEY}".encode())], 401),
    ([(b"authorization", f"Bearer {KEY}".encode()), (b"x-api-key", KEY.encode())], 401),  # one credential a request
])  # fmt: skip
def test_a_bearer_token_is_a_key_like_x_api_key(client, headers, status):
    assert asgi_post(client.app, headers, json.dumps(edit()).encode())[0] == status


def test_two_credentials_are_refused_as_two_not_as_a_wrong_key(client):
    """Both right, they were refused as "missing or wrong x-api-key": the user went to check a key that was fine."""
    both = [(b"authorization", f"Bearer {KEY}".encode()), (b"x-api-key", KEY.encode())]
    status, body = asgi_post(client.app, both, json.dumps(edit()).encode())
    assert status == 401 and json.loads(body)["detail"][0]["msg"].startswith("send one credential: x-api-key or")


@pytest.mark.parametrize("count", [0, 11])
def test_an_image_list_of_the_wrong_length_is_one_error_at_image(client, count):
    """`"image": []` was two errors per branch of pydantic's union, located at "constrained-str" and
    "list[constrained-str]", which the studio showed as "bad file: Input should be a valid string bad file: ..."."""
    r = client.post("/v1/images", json=edit(image=[b64_png()] * count), headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"] == [
        {"loc": ["body", "image"], "msg": f"give 1 to 10 input images (got {count}); omit image for text-to-image",
         "type": "value_error"}
    ]  # fmt: skip


def test_the_limits_bound_what_is_rendered_not_only_the_fields_given(client):
    """One side of an edit set the other from the image's aspect past serve.max_side (256x1024 under 256), and an
    omitted step count rendered the pipeline's 40 under serve.max_steps 4: the deployment's bounds were not bounds."""
    r = client.post("/v1/images", json=edit(image=b64_png(32, 128), width=256), headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"] == [
        {
            "loc": ["body", "width"],
            "type": "value_error",
            "msg": "width: 256 gives 256x1024, past this service's serve.max_side (256); give width and height <= 256",
        }
    ]
    for path, body in (("/v1/images", edit()), ("/v1/layers", {"image": b64_png(), "mask": "auto", "seed": 1})):
        body.pop("num_inference_steps", None)
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0] | {"type": None} == {
            "loc": ["body", "num_inference_steps"], "type": None,
            "msg": "num_inference_steps: omitted, it is the pipeline's 40, above this service's serve.max_steps (4); give "
                   "num_inference_steps <= 4"}  # fmt: skip
    assert client.post("/v1/images", json=edit(image=b64_png(32, 128), width=64), headers=AUTH).status_code == 200


def test_an_input_downscaled_to_max_side_is_said_to_the_client(client):
    """A 600x300 photo came back 256x128 with no word (the CLI reads files up to 4096 px and says when it shrinks
    one): a masked edit could not be dropped back into the layout it came from."""
    buf = io.BytesIO()
    Image.new("RGB", (600, 300), "teal").save(buf, format="PNG")
    big = base64.b64encode(buf.getvalue()).decode()
    r = client.post("/v1/images", json=edit(image=[b64_png(), big]), headers=AUTH)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (256, 128)
    assert r.headers["x-warning"] == (
        "image[1]: 600x300 was read at 256x128 (this service reads inputs up to 256 px on the long side: "
        "serve.max_side, at most 2048), so the result is that size"
    )
    assert "x-warning" not in client.post("/v1/images", json=edit(), headers=AUTH).headers


def test_a_batch_lines_field_names_sent_to_the_api_say_the_apis(client):
    """A copied batch line was refused "Extra inputs are not permitted" at `images` and `output`, naming no way on;
    the batch command says "did you mean 'images'?" the other way round."""
    line = {"prompt": "on marble", "images": [b64_png()], "output": "sku.webp", "num_inference_steps": 1}
    r = client.post("/v1/images", json=line, headers=AUTH)
    assert r.status_code == 422 and [(d["loc"], d["msg"]) for d in r.json()["detail"]] == [
        (["body", "images"], "Extra inputs are not permitted; a batch line's 'images' is 'image' here"),
        (["body", "output"], "Extra inputs are not permitted; a batch line's 'output' is 'output_format' here"),
    ]
    r = client.post("/v1/images", json={"prompt": "a", "steps": 1}, headers=AUTH)  # the CLI's --steps
    assert [d["msg"] for d in r.json()["detail"]] == [
        "Extra inputs are not permitted; did you mean 'num_inference_steps'?"
    ]


def test_limits_answer_413_and_422_naming_the_field(client):
    assert (
        client.post("/v1/images", json=edit(image=b64_png(400, 400)), headers=AUTH).status_code == 413
    )  # body > 0.25 MB

    def field_of(r):
        assert r.status_code == 422, r.text
        return r.json()["detail"][0]["loc"]

    assert field_of(client.post("/v1/images", json=edit(num_inference_steps=50), headers=AUTH)) == [
        "body",
        "num_inference_steps",
    ]
    # A deployment's own limit says so: "less than or equal to 4" alone read as the model's limit.
    said = client.post("/v1/images", json=edit(num_inference_steps=50), headers=AUTH).json()["detail"][0]["msg"]
    assert said == "Input should be less than or equal to 4 (this service's serve.max_steps)"
    assert field_of(client.post("/v1/images", json=edit(guidance_scale=-1), headers=AUTH)) == ["body", "guidance_scale"]
    assert field_of(client.post("/v1/images", json=edit(width=100), headers=AUTH)) == ["body", "width"]
    r = client.post("/v1/images", json=edit(width=64, aspect_ratio="1:1"), headers=AUTH)  # was at `body` alone
    assert (
        field_of(r) == ["body", "aspect_ratio"] and "give it or width/height, not both" in r.json()["detail"][0]["msg"]
    )
    assert field_of(client.post("/v1/images", json=edit(colour="red"), headers=AUTH)) == ["body", "colour"]
    assert field_of(client.post("/v1/images", json=edit(image="bm90IGFuIGltYWdl"), headers=AUTH)) == ["body", "image"]
    assert field_of(client.post("/v1/images", json=edit(image=[b64_png(), "%%%"]), headers=AUTH)) == [
        "body",
        "image",
        1,
    ]
    r = client.post("/v1/images", json=edit(prompt="red bottle " * 700), headers=AUTH)
    assert field_of(r) == ["body", "prompt"] and "limit is 1024" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/images", json=edit(loras=[{"name": "nope"}]), headers=AUTH)
    assert (
        field_of(r) == ["body", "loras", 0, "name"] and "known adapters: brand, sketch" in r.json()["detail"][0]["msg"]
    )
    r = client.post("/v1/images", json=edit(loras=[{"name": "brand"}, {"name": "brand", "weight": 0.1}]), headers=AUTH)
    assert field_of(r) == ["body", "loras", 1, "name"] and "brand' is given twice" in r.json()["detail"][0]["msg"]


def test_decompression_bomb_is_refused_and_big_inputs_are_downscaled(client, cfg):

    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, format="PNG")  # ~140 KB of PNG, 144 M pixels when decoded
    r = client.post("/v1/images", json=edit(image=base64.b64encode(buf.getvalue()).decode()), headers=AUTH)
    assert r.status_code == 413 and "pixels" in r.text
    buf = io.BytesIO()
    Image.new("RGB", (3000, 1500)).save(buf, format="JPEG")
    assert decode_image(buf.getvalue()).size == (2048, 1024)


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:9/x.png", "127.0.0.1 (loopback)"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 (link-local)"),
    ("http://2852039166/latest/meta-data/", "169.254.169.254 (link-local)"),  # the same address as one number
    ("http://localhost/x.png", "(loopback)"),
    ("http://[::1]/x.png", "::1 (loopback)"),
    ("http://[::ffff:127.0.0.1]/x.png", "IPv4-mapped address of 127.0.0.1, loopback"),
    ("http://[64:ff9b::a9fe:a9fe]/x.png", "NAT64 address of 169.254.169.254, link-local"),
    ("http://10.0.0.1/x.png", "10.0.0.1 (private)"),
    ("file:///etc/passwd", "only http and https"),
    ("ftp://example.com/x.png", "only http and https"),
    ("http://127.0.0.1:99999/", "malformed URL: Port out of range"), ("http://h:abc/", "malformed URL: Port could not"),
    ("http://h:-1/", "malformed URL: Port could not"), ("http://[::1/", "malformed URL: Invalid IPv6 URL"),
])  # fmt: skip
def test_private_non_http_and_malformed_urls_are_refused_naming_the_reason(client, url, reason):
    r = client.post("/v1/images", json=edit(image=url), headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"], r.text
    assert reason in r.json()["detail"][0]["msg"] and "fetching" not in r.text  # refused, not a failed fetch


@pytest.mark.parametrize("address, reason", [
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("169.254.0.1", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("fd12:3456::1", "private"), ("2001:db8::1", "private"), ("192.0.2.1", "private"), ("198.18.0.1", "private"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("::127.0.0.1", "reserved"),
    ("::ffff:8.8.8.8", "reserved"), ("64:ff9b:1::a9fe:a9fe", "reserved"),
    ("100.64.0.1", "not globally routable"), ("fec0::1", "site-local"),
    ("::ffff:169.254.169.254", "IPv4-mapped address of 169.254.169.254, link-local"),
    ("::ffff:10.0.0.1", "IPv4-mapped address of 10.0.0.1, private"),
    ("2002:a9fe:a9fe::", "6to4 address of 169.254.169.254, link-local"),
    ("2002:7f00:1::1", "6to4 address of 127.0.0.1, loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 address of 169.254.169.254, link-local"),
    ("64:ff9b::7f00:1", "NAT64 address of 127.0.0.1, loopback"),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "Teredo address of 169.254.169.254, link-local"),
    ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700::1111", None), ("2002:808:808::1", None),
])  # fmt: skip
def test_address_check_names_the_refusal_reason(address, reason):
    """Network-free: the check on the address itself, for every form a private target can take."""
    assert refusal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "host", ["169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518"]
)
def test_numeric_spellings_of_the_metadata_address_are_refused(host):
    """Numeric hosts are parsed locally (no DNS query) and checked like any other answer."""
    with pytest.raises(URLRefused, match=r"169\.254\.169\.254 \(link-local\)"):
        resolve_checked(host, 80, allow_private=False)


def test_socket_guard_refuses_and_reports_connections_outside_loopback(no_outside_network):
    with pytest.raises(OSError, match="test socket guard"):
        socket.create_connection(("192.0.2.1", 80), timeout=5)  # TEST-NET-1: would go out through the default route
    assert no_outside_network == [("192.0.2.1", 80)]
    no_outside_network.clear()  # this test expected the refusal; any other test would fail at teardown


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


class _Origin(http.server.BaseHTTPRequestHandler):
    """A local origin for fetch's edge cases: each path one behaviour."""

    protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the connection closes
    body = b"\x89PNG fake image bytes"

    def do_GET(self):
        if self.path.startswith("/hops/"):  # /hops/N redirects N times before the image
            n = int(self.path.rsplit("/", 1)[1])
            return self._send(302, b"", location=f"/hops/{n - 1}") if n else self._send(200, self.body, length=True)
        routes = {
            "/": lambda: self._send(200, self.body, length=True),
            "/x.png": lambda: self._send(200, self.body, length=True),
            "/unsized": lambda: self._send(200, [self.body * 4096] * 10, length=False),  # ~1 MB: many socket reads
            "/endless": lambda: self._send(200, itertools.repeat(self.body), length=False),
            "/missing": lambda: self._send(404, b"no", length=True),
            "/relative": lambda: self._send(302, b"", location="x.png"),
            "/no-location": lambda: self._send(302, b""),
            "/to-metadata": lambda: self._send(302, b"", location="http://169.254.169.254/latest/"),
            "/to-malformed": lambda: self._send(302, b"", location="http://a]b/x.png"),  # httpx takes it, urljoin not
            "/headers": lambda: self._send(
                200,
                f"{self.headers['Host']}|{self.headers['Accept']}|{self.headers['Accept-Encoding']}".encode(),
                length=True,
            ),
            "/trickle": self._trickle,
            "/gzip": lambda: self._send(200, gzip.compress(gzip.compress(bytes(2**20))), length=True, encoding="gzip"),
            "/slow": lambda: (time.sleep(1.0), self._send(200, self.body, length=True)),
            "/pause": lambda: (time.sleep(0.3), self._send(200, _png(), length=True)),
        }
        routes[self.path]()

    def _trickle(self):  # a header byte every 50 ms, for 3 s: each read arrives in time, the whole never
        with contextlib.suppress(ConnectionError):
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            for _ in range(60):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.05)

    def _send(self, status, body, length=False, location=None, encoding=None):
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # the client hung up on purpose (over the size cap)
            for part in [body] if isinstance(body, bytes) else body:
                self.wfile.write(part)
                self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def origin():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_allowed_private_url_is_fetched_and_redirects_are_rechecked(origin, monkeypatch):
    base = f"http://127.0.0.1:{origin}"
    assert fetch(f"{base}/x.png", allow_private=True) == _Origin.body
    with pytest.raises(URLRefused, match="loopback"):
        fetch(f"{base}/x.png", allow_private=False)
    with pytest.raises(URLRefused, match="limit is 10"):
        fetch(f"{base}/x.png", allow_private=True, max_bytes=10)
    # A public-looking first hop that redirects to the metadata service is refused at the second hop, which is
    # checked with the caller's flag (the guard stays on after a redirect).
    original, calls = urls.resolve_checked, []

    def first_hop_public(host, port, allow):
        calls.append((host, allow))
        return "127.0.0.1" if host == "public.example" else original(host, port, allow)

    monkeypatch.setattr(urls, "resolve_checked", first_hop_public)
    with pytest.raises(URLRefused, match=r"169\.254\.169\.254 \(link-local\)"):
        fetch(f"http://public.example:{origin}/to-metadata")
    assert calls == [("public.example", False), ("169.254.169.254", False)]


def test_fetch_refuses_each_unsafe_or_failed_response_naming_why(origin, monkeypatch):
    base, body = f"http://127.0.0.1:{origin}", _Origin.body
    assert fetch(f"{base}/relative", allow_private=True) == body  # a relative Location joins the URL
    assert fetch(base, allow_private=True) == body  # no path: "/"
    assert fetch(f"{base}/hops/3", allow_private=True) == body  # MAX_REDIRECTS hops are followed
    # Exactly at the size cap is allowed, with and without a declared length.
    assert fetch(f"{base}/x.png", allow_private=True, max_bytes=len(body)) == body
    assert fetch(f"{base}/unsized", allow_private=True, max_bytes=40960 * len(body)) == body * 40960
    refusals = [
        (f"http://user:pw@127.0.0.1:{origin}/x.png", {}, "^URLs with credentials are refused$"),
        (f"http://user@127.0.0.1:{origin}/x.png", {}, "^URLs with credentials are refused$"),
        ("http:///x.png", {}, "^the URL has no host$"),
        ("gopher://example.com/x.png", {}, r"\(got gopher scheme\)"),
        ("//example.com/x.png", {}, r"\(got no scheme\)"),
        ("http://no-such-host.invalid/x.png", {}, "^cannot resolve host 'no-such-host.invalid'"),
        (f"{base}/missing", {}, "gave HTTP 404$"),
        (f"{base}/hops/4", {}, "more than 3 redirects$"),
        (f"{base}/no-location", {}, "more than 3 redirects$"),
        (f"{base}/x.png", {"max_bytes": len(body) - 1}, f"is {len(body)} bytes; the limit is {len(body) - 1}$"),
        (f"{base}/unsized", {"max_bytes": 100}, "over the 100-byte limit$"),  # no Content-Length to refuse up front
        (f"{base}/endless", {"max_bytes": 10_000, "timeout_s": 5}, "over the 10,000-byte limit$"),  # read as it streams
        (f"{base}/slow", {"timeout_s": 0.3}, r"took longer than 0.3 s \(serve.url_timeout_s"),
        ("http://127.0.0.1:9/x.png", {}, "failed: ConnectError"),  # the discard port: nothing listens
        (f"{base}/x\x00.png", {}, "^malformed URL: Invalid non-printable ASCII"),  # httpx's InvalidURL, was a 500
        ("http://127.0.0.1:0/x.png", {}, "^malformed URL: port 0$"),  # was fetched from port 80
        (f"{base}/to-malformed", {}, "redirects to a malformed URL: Invalid IPv6 URL$"),
    ]
    for url, kwargs, reason in refusals:
        with pytest.raises(URLRefused, match=reason) as refused:
            fetch(url, allow_private=True, **kwargs)
        assert refused.value.too_large == ("limit" in reason), url


def test_fetch_ignores_proxy_settings_in_the_environment(origin, monkeypatch):
    """A proxy would make the request from elsewhere, past the address check."""
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert fetch(f"http://127.0.0.1:{origin}/x.png", allow_private=True) == _Origin.body


def test_a_link_local_address_with_a_zone_is_refused_like_one_without():
    with pytest.raises(URLRefused, match=r"resolves to fe80::1(%lo)? \(link-local\); .*\(serve.allow_private_urls\)"):
        resolve_checked("fe80::1%lo", 80, allow_private=False)


def test_fetch_connects_to_the_checked_address_and_keeps_the_name_in_the_host_header(origin, monkeypatch):
    """DNS is asked once; a second answer (rebinding) is never used, and the origin still sees its own name."""
    answers = []

    def resolve_once(host, port, allow_private):
        answers.append((host, port))
        return "127.0.0.1"

    monkeypatch.setattr(urls, "resolve_checked", resolve_once)
    assert fetch(f"http://images.example:{origin}/headers") == f"images.example:{origin}|image/*|identity".encode()
    assert answers == [("images.example", origin)]
    assert fetch(f"http://images.example:{origin}/x.png") == _Origin.body
    # A URL without a port gets the scheme's: 80 for http, 443 for https.
    for url in ("http://images.example/x.png", "https://images.example/x.png"):
        with contextlib.suppress(URLRefused):  # whatever does or does not listen on this machine's 80 and 443
            fetch(url, timeout_s=0.5)
    assert answers[-2:] == [("images.example", 80), ("images.example", 443)]


def test_one_time_budget_covers_all_of_a_requests_urls(cfg, gen, origin):
    """Each URL had its own serve.url_timeout_s: 11 slow URLs held a queue slot 11 times as long (~2 min at 10 s)."""
    local = copy.deepcopy(cfg)
    local.serve.allow_private_urls, local.serve.url_timeout_s = True, 0.5  # each /pause takes 0.3 s: two do not fit
    with TestClient(create_app(local, [KEY], generator=gen)) as c:
        urls_ = [f"http://127.0.0.1:{origin}/pause"] * 3
        r = c.post("/v1/images", json={"prompt": "x", "image": urls_}, headers={"x-api-key": KEY})
    (detail,) = r.json()["detail"]
    assert r.status_code == 422 and detail["loc"] == ["body", "image", 1], r.text
    assert "took longer than 0.5 s (serve.url_timeout_s, for all of a request's URLs)" in detail["msg"]


def test_the_deadline_bounds_a_url_whose_headers_trickle_and_a_compressed_body_is_refused_unpacked(origin):
    """A server sending a header byte a second held a request (and its queue slot) past serve.url_timeout_s for as
    long as it liked: httpx's timeout bounds each read. A gzip inside a gzip (here 1 MB of zeros in ~1 KB) was
    unpacked before the size cap saw it (200 MB from 496 bytes, +400 MB of server memory)."""
    started = time.monotonic()
    with pytest.raises(URLRefused, match=r"took longer than 0.5 s \(serve.url_timeout_s"):
        fetch(f"http://127.0.0.1:{origin}/trickle", allow_private=True, timeout_s=0.5)
    assert time.monotonic() - started < 2.0  # the trickle lasts 3 s
    with pytest.raises(URLRefused, match=r"was sent compressed \(Content-Encoding: gzip\); image URLs are fetched as"):
        fetch(f"http://127.0.0.1:{origin}/gzip", allow_private=True, max_bytes=10_000)


def test_a_url_whose_turn_comes_after_the_requests_deadline_is_not_fetched(origin):
    with pytest.raises(URLRefused, match=r"took longer than 2 s \(serve.url_timeout_s, for all of a request's URLs\)$"):
        fetch(f"http://127.0.0.1:{origin}/x.png", allow_private=True, timeout_s=2, deadline=time.monotonic() - 0.1)


def test_full_queue_answers_429(cfg, gen):
    app = create_app(cfg, [KEY], generator=gen)
    worker = app.state.worker
    release = threading.Event()
    with TestClient(app) as c:
        running = threading.Event()
        worker.submit(lambda: (running.set(), release.wait(30)))
        assert running.wait(10)
        for _ in range(cfg.serve.max_queue):
            worker.submit(lambda: None)
        r = c.post("/v1/images", json=edit(), headers=AUTH)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"  # no image timed yet
        for seconds in (6.0, 8.4):  # jobs (images or layers) took 7.2 s on average: a slot frees in about that
            worker.record(seconds)
        assert c.post("/v1/images", json=edit(), headers=AUTH).headers["retry-after"] == "8"
        release.set()
        for _ in range(1000):  # the queued jobs start (each frees its slot), then there is room again
            if worker.waiting == 0:
                break
            time.sleep(0.01)
        assert c.post("/v1/images", json=edit(), headers=AUTH).status_code == 200
        metrics = c.get("/metrics").text
        assert 'qwen_lora_rejected_total{reason="queue_full"} 2.0' in metrics
        assert 'qwen_lora_http_responses_total{code="429",path="/v1/images"} 2.0' in metrics


def test_health_metrics_and_openapi(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["adapters"] == 2  # open: a count; the names are behind the key
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE qwen_lora_images_total counter" in metrics.text
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["ImageRequest"]["properties"]["num_inference_steps"]["anyOf"][0]["maximum"] == 4
    # Every request field says what it is (LayersRequest.mask_feather and ElementRef's box had no description).
    ours = ("ImageRequest", "LayersRequest", "ElementRef", "LoraRef")
    undescribed = [f"{m}.{k}" for m in ours for k, v in schemas[m]["properties"].items() if not v.get("description")]
    assert undescribed == []
    feather = [schemas[m]["properties"]["mask_feather"] for m in ("ImageRequest", "LayersRequest")]
    assert feather[0] == feather[1] and (feather[0]["default"], feather[0]["maximum"]) == (8, 64)
    # Whole-number limits stay whole: the seed's read 9.223372036854776e+18, i.e. 2**63, which the service refuses.
    raw = client.get("/openapi.json").text
    assert '"maximum":9223372036854775807' in raw.replace(" ", "") and "9.223372036854776e+18" not in raw
    width = schemas["ImageRequest"]["properties"]["width"]["anyOf"][0]
    assert [type(width[k]) for k in ("minimum", "maximum", "multipleOf")] == [int, int, int]
    assert type(schemas["ElementRef"]["properties"]["x"]["minimum"]) is int
    guidance = schemas["ImageRequest"]["properties"]["guidance_scale"]["anyOf"][0]
    assert type(guidance["maximum"]) is float  # a float field keeps its float limits


def test_api_keys_come_from_the_env_var_or_the_file(tmp_path):
    cfg = Config()
    assert load_api_keys(cfg.serve, {"QWEN_LORA_API_KEYS": "a, b,"}) == ["a", "b"]
    (tmp_path / "keys").write_text("# ops\nk1\n\nk2  # rotated 2026-01\n")
    cfg.serve.api_keys_file = str(tmp_path / "keys")
    assert load_api_keys(cfg.serve, {}) == ["k1", "k2"]
    cfg.serve.api_keys_file = None
    with pytest.raises(ValueError, match="no API keys"):
        load_api_keys(cfg.serve, {})


def test_the_key_check_takes_text_or_bytes_and_nothing_matches_an_absent_key():
    check = KeyCheck(["s3cret", "XXXX"])
    assert check("s3cret") and check(b"s3cret") and check("XXXX")
    assert not any(check(k) for k in (None, "", b"", "s3cre", "s3cret ", "S3CRET"))


def test_a_file_that_is_not_an_image_is_named_plainly(client):
    r = client.post("/v1/images", json=edit(image=base64.b64encode(b"this is a text file").decode()), headers=AUTH)
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "image"] and "not an image format PIL recognises" in detail["msg"]
    assert "_io." not in detail["msg"]  # no repr of our in-memory buffer


def test_an_unnamed_configured_adapter_serves_under_its_derived_name_and_weight(tiny_model_dir, tmp_path):
    """`serve.adapters: [{path: ...}]` keyed the default set by '': every request without `loras` was a 500."""
    own = Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)
    cfg = Config()
    cfg.model.pretrained, cfg.data.resolution, cfg.serve.max_steps = str(tiny_model_dir), 64, 2
    path = make_random_lora(own.pipe.transformer, tmp_path / "plain.v2", seed=7)
    cfg.serve.adapters = [ServeAdapter("", str(path), 0.5)]
    with TestClient(create_app(cfg, [KEY], generator=own)) as c:
        for body in ({}, {"loras": [{"name": "plain_v2"}]}):
            r = c.post("/v1/images", json={"prompt": "x", "num_inference_steps": 1, "seed": 1, **body}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert [(a["name"], a["weight"]) for a in read_settings(r.content)["loras"]] == [("plain_v2", 0.5)]


def test_the_service_says_where_it_serves_in_one_line_and_uvicorn_stays_quiet(cfg, gen, capfd):
    """Was uvicorn's four start-up lines and an access line per request, and no line of ours (URL, adapters)."""
    with socket.socket() as probe:  # a free port (released just before the service binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    local = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, host="127.0.0.1", port=port))
    with running(make_server(local, [KEY], generator=gen)):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert json.loads(answer.read())["status"] == "ok"
    assert capfd.readouterr().err.splitlines() == [
        f"serving {cfg.model.pretrained} (adapters: brand, sketch) at http://127.0.0.1:{port}/: the studio page at /, "
        "the API under /v1, metrics at /metrics; Ctrl-C stops"
    ]


def test_layers_responses_are_counted_under_their_path(cfg, gen):
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:  # a fresh app: its counters start at zero
        assert c.post("/v1/layers", json={}, headers=AUTH).status_code == 422
        metrics = c.get("/metrics").text
    assert 'qwen_lora_http_responses_total{code="422",path="/v1/layers"} 1.0' in metrics
    assert 'path="other"' not in metrics


def test_line_wrapped_base64_is_accepted_as_the_same_bytes(client):
    text = b64_png()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\n"  # what GNU `base64 FILE` writes
    r = client.post("/v1/images", json=edit(image=f"data:image/png;base64,{wrapped}", response_format="b64_json"),
                    headers=AUTH)  # fmt: skip
    assert r.status_code == 200, r.text
    sha = hashlib.sha256(base64.b64decode(text)).hexdigest()
    assert r.json()["data"][0]["settings"]["images"] == [{"sha256": sha, "path": None}]


@pytest.mark.parametrize("payload", [
    base64.urlsafe_b64encode(b"\xfb\xff\xbf\xfb").decode(),  # "-_-_-w==": the URL-safe alphabet
    base64.b64encode(b"hello").decode().rstrip("="),  # "aGVsbG8": its padding dropped
])  # fmt: skip
def test_near_miss_base64_is_refused_saying_how_to_encode_it(client, payload):
    r = client.post("/v1/images", json=edit(image=payload), headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
    msg = r.json()["detail"][0]["msg"]
    assert "not valid base64" in msg and "base64 -w0 FILE" in msg and "'=' padding" in msg and "URL-safe" in msg
