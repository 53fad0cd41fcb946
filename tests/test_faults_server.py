"""Issue #11, service items, reproduced on the tiny model: memory bounded by admission (a refused request decodes
nothing, decodes are bounded, large inputs decode at the working size, a job's inputs die with it) and cheap
refusals (the key before the body, NaN/inf -> 422, every 5xx counted, a client that leaves frees its slot, a 422
never echoes the input)."""

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import gc
import gzip
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import weakref

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from qwen_image_lora import images as images_module
from qwen_image_lora.config import Config
from qwen_image_lora.inference import guards, server, service
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.server import create_app
from qwen_image_lora.inference.studio import CSP
from qwen_image_lora.inference.worker import Stopping, Worker
from tests.launch import running

KEY = "faults-key-0123456789"
AUTH = {"x-api-key": KEY}


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)


@pytest.fixture
def cfg(tiny_model_dir):
    cfg = Config()
    cfg.model.pretrained = str(tiny_model_dir)
    cfg.data.resolution = 64
    cfg.serve.max_steps = 2
    cfg.serve.max_side = 256
    cfg.serve.max_body_mb = 0.5
    cfg.serve.max_queue = 4
    return cfg


def png_b64(size=(96, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def edit(**kw) -> dict:
    return {"image": png_b64(), "prompt": "put it on white", "num_inference_steps": 1, "seed": 3, **kw}


async def call(app, body: bytes, headers=(), leave: asyncio.Event | None = None):
    """One POST /v1/images through the ASGI interface. After the body the client waits for the answer, or leaves
    when `leave` is set. Returns (status, response body, number of receive() calls)."""
    sent, reads, chunks, answered = (
        [],
        [0],
        [{"type": "http.request", "body": body, "more_body": False}],
        asyncio.Event(),
    )

    async def receive():
        reads[0] += 1
        if chunks:
            return chunks.pop()
        waits = [asyncio.ensure_future(answered.wait())] + ([asyncio.ensure_future(leave.wait())] if leave else [])
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/images", "raw_path": b"/v1/images", "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), reads[0]


async def until(condition, what: str, seconds: float = 30.0):
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def block_worker(worker) -> threading.Event:
    """Occupy the model worker with a job that waits for the returned event."""
    release, running = threading.Event(), threading.Event()
    worker.submit(lambda: (running.set(), release.wait(60)))
    assert running.wait(10)
    return release


# --------------------------------------------------------------------------------------------- #11.8 memory


def test_a_request_refused_with_429_decodes_nothing(cfg, gen, monkeypatch):
    decoded = []
    monkeypatch.setattr(
        server, "decode_image", lambda data, **kw: decoded.append(1) or images_module.decode_image(data, **kw)
    )
    app = create_app(cfg, [KEY], generator=gen)
    worker = app.state.worker
    release = block_worker(worker)
    try:
        for _ in range(cfg.serve.max_queue):
            worker.submit(lambda: None)
        with TestClient(app) as c:
            r = c.post("/v1/images", json=edit(image=[png_b64(), png_b64((64, 96))]), headers=AUTH)
        assert r.status_code == 429
        assert decoded == []  # admission came first: nothing was decoded for a request that could not be served
    finally:
        release.set()


def test_concurrent_decodes_never_exceed_the_limit(cfg, gen, monkeypatch):
    lock, release = threading.Lock(), threading.Event()
    state = {"active": 0, "peak": 0, "entered": 0}

    def slow_decode(data, **kw):
        with lock:
            state["entered"] += 1
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        release.wait(60)
        with lock:
            state["active"] -= 1
        return images_module.decode_image(data, **kw)

    monkeypatch.setattr(server, "decode_image", slow_decode)
    app = create_app(cfg, [KEY], generator=gen)
    n = cfg.serve.max_queue
    assert n > server.MAX_CONCURRENT_DECODES

    async def main():
        calls = [asyncio.ensure_future(call(app, json.dumps(edit(seed=i)).encode(), [(b"x-api-key", KEY.encode())]))
                 for i in range(n)]  # fmt: skip
        try:  # every request is admitted and either decoding or waiting for a decode slot
            await until(lambda: state["entered"] + app.state.decodes.waiting == n, "all requests at the decoder")
            assert state["entered"] == server.MAX_CONCURRENT_DECODES
        finally:
            release.set()
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    assert [status for status, _, _ in results] == [200] * n
    assert state["peak"] == server.MAX_CONCURRENT_DECODES and state["entered"] == n


@pytest.mark.parametrize("mode, side, fmt, max_side, frame_bytes, limit", [
    ("L", 8192, "PNG", 2048, 8192 * 8192, 2.0),  # the report's case: a small PNG that decodes to 8192x8192
    ("RGB", 4096, "JPEG", 512, 4096 * 4096 * 4, 0.25),  # JPEG: decoded at 1/8 scale, the full frame never exists
])  # fmt: skip
def test_large_inputs_decode_within_one_native_frame(tmp_path, mode, side, fmt, max_side, frame_bytes, limit):
    """Peak memory of one decode, measured in a fresh process, in multiples of the image's native frame.
    Before: the frame, then an RGB copy at full size (a 8192x8192 greyscale PNG cost ~370 MB, not 64)."""
    image = Image.new(mode, (side, side), "white")
    draw = ImageDraw.Draw(image)
    for i in range(0, side, 256):
        draw.line((0, i, side, side - i), fill="black", width=9)
    path = tmp_path / f"big.{fmt.lower()}"
    image.save(path, format=fmt)
    del image, draw
    assert path.stat().st_size < 2_000_000  # a small upload, well under any body limit
    probe = (  # images.py alone (not the package, which imports torch and would mask the decode's peak)
        "import importlib.util, re, sys\n"
        "spec = importlib.util.spec_from_file_location('images', sys.argv[1])\n"
        "images = importlib.util.module_from_spec(spec); spec.loader.exec_module(images)\n"
        "data = open(sys.argv[2], 'rb').read()\n"
        # VmHWM: this process's peak RSS (ru_maxrss would carry the forking pytest process's peak over)
        "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "before = peak()\n"
        "image = images.decode_image(data, max_side=int(sys.argv[3]))\n"
        "print(image.size[0], image.size[1], peak() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, images_module.__file__, str(path), str(max_side)],
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()  # fmt: skip
    assert (int(out[0]), int(out[1])) == (max_side, max_side)
    assert int(out[2]) < limit * frame_bytes, f"decode peak {int(out[2]) / 2**20:.0f} MiB"


def test_a_jobs_inputs_are_released_when_it_ends(cfg, gen, monkeypatch):
    refs = []

    def tracked_decode(data, **kw):
        image = images_module.decode_image(data, **kw)
        refs.append(weakref.ref(image))
        return image

    monkeypatch.setattr(server, "decode_image", tracked_decode)
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        assert c.post("/v1/images", json=edit(image=[png_b64(), png_b64((64, 96))]), headers=AUTH).status_code == 200
        gc.collect()
        assert len(refs) == 2 and [r() for r in refs] == [None, None]  # the idle worker holds no old job


# --------------------------------------------------------------------------------------------- #11.9 refusals


@pytest.mark.parametrize("key", [None, b"wrong"])
def test_a_wrong_or_missing_key_is_refused_before_the_body_is_read(cfg, gen, key):
    app = create_app(cfg, [KEY], generator=gen)
    headers = [] if key is None else [(b"x-api-key", key)]
    status, body, reads = asyncio.run(call(app, json.dumps(edit()).encode(), headers))
    assert (status, reads) == (401, 0) and b"x-api-key" in body
    # A body declared far over the limit still gets 401 (not 413): without a key, nothing about it is looked at.
    status, _, reads = asyncio.run(call(app, b"{}", headers + [(b"content-length", b"19000000")]))
    assert (status, reads) == (401, 0)
    assert asyncio.run(call(app, json.dumps(edit()).encode(), [(b"x-api-key", KEY.encode())]))[0] == 200


@pytest.mark.parametrize("raw, field", [
    ('"guidance_scale": NaN', "guidance_scale"), ('"guidance_scale": Infinity', "guidance_scale"),
    ('"guidance_scale": -Infinity', "guidance_scale"), ('"guidance_scale": 1e400', "guidance_scale"),
    ('"seed": 1e400', "seed"), ('"num_inference_steps": NaN', "num_inference_steps"), ('"prompt": NaN', "prompt"),
    ('"loras": [{"name": "x", "weight": Infinity}]', "loras"),
])  # fmt: skip
def test_nan_and_infinity_in_json_give_422_naming_the_field(cfg, gen, raw, field):
    others = {k: v for k, v in edit().items() if k != field}
    body = json.dumps(others).rstrip("}") + ", " + raw + "}"
    with TestClient(create_app(cfg, [KEY], generator=gen), raise_server_exceptions=False) as c:
        r = c.post("/v1/images", content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:2] == ["body", field]


@pytest.mark.parametrize("raw, key", [
    ('"seed": 1, "seed": 2', "seed"),  # the second replaced the first
    ('"loras": {"brand": 1, "brand": 2}', "brand"),  # rendered at 2, though an adapter named twice is a 422
])  # fmt: skip
def test_a_key_given_twice_is_a_422_naming_it(cfg, gen, raw, key):
    """JSON keeps the last of a repeated key, so the request was taken with one of two meanings; a batch line with
    the same key twice is refused."""
    body = json.dumps({k: v for k, v in edit().items() if k != "seed"}).rstrip("}") + ", " + raw + "}"
    with TestClient(create_app(cfg, [KEY], generator=gen), raise_server_exceptions=False) as c:
        r = c.post("/v1/images", content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"] == [
        {"loc": ["body"], "msg": f"'{key}' given twice; JSON keeps only the last, so keep one", "type": "value_error"}
    ]


@pytest.mark.parametrize("body, headers", [
    (b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),  # nested past the parser's depth
    ('{"prompt": "\xff\xfe"}'.encode("latin-1"), {}),  # not UTF-8
    (gzip.compress(b'{"prompt": "a"}', mtime=0), {"content-encoding": "gzip"}),  # mtime=0: the same id in every xdist worker
])  # fmt: skip
def test_a_body_fastapi_cannot_parse_is_refused_in_the_usual_shape_saying_why(cfg, gen, body, headers):
    """It was a 400 `{"detail": "There was an error parsing the body"}`: another shape than every other refusal (the
    studio reads detail[].msg), naming no cause and no next step."""
    with TestClient(create_app(cfg, [KEY], generator=gen), raise_server_exceptions=False) as c:
        r = c.post("/v1/images", content=body, headers={**AUTH, "content-type": "application/json", **headers})
        missing = c.get("/v1/nothing-here", headers=AUTH)
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["body"]
    assert r.json()["detail"][0]["msg"].startswith("the body could not be read as JSON: send UTF-8 JSON, uncompressed")
    assert missing.status_code == 404 and missing.json()["detail"][0]["msg"] == "Not Found"


def test_every_5xx_is_counted_in_metrics(cfg, gen, monkeypatch):
    app = create_app(cfg, [KEY], generator=gen)

    def broken(request):
        raise RuntimeError("pipeline failed")

    monkeypatch.setattr(app.state.generator, "generate", broken)  # our own class: an unexpected error in a job
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/v1/images", json=edit(), headers=AUTH).status_code == 500  # sent by Starlette itself
        assert 'qwen_lora_http_responses_total{code="500",path="/v1/images"} 1.0' in c.get("/metrics").text


def test_a_client_that_leaves_before_its_job_starts_frees_its_slot(cfg, gen):
    app = create_app(cfg, [KEY], generator=gen)
    worker, metrics = app.state.worker, app.state.metrics
    release = block_worker(worker)

    async def main():
        leave = asyncio.Event()
        request = asyncio.ensure_future(call(app, json.dumps(edit()).encode(), [(b"x-api-key", KEY.encode())], leave))
        await until(lambda: worker.waiting == 1, "the request admitted")
        leave.set()
        return await asyncio.wait_for(request, 30)  # answered without waiting for the worker

    try:
        status, _, _ = asyncio.run(main())
        assert worker.waiting == 0  # the slot is free while the worker is still busy
        assert status == server.CLIENT_GONE
    finally:
        release.set()
    with TestClient(app) as c:  # the withdrawn job never runs; the next request does
        assert c.post("/v1/images", json=edit(), headers=AUTH).status_code == 200
        assert "qwen_lora_images_total 1.0\n" in c.get("/metrics").text
    assert metrics.images == 1


@pytest.mark.parametrize("extra", [{"prompt": "x" * 300_000}, {"colour": "x" * 300_000}])
def test_a_422_does_not_echo_the_input(cfg, gen, extra):
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        r = c.post("/v1/images", json=edit(**extra), headers=AUTH)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][:2] == ["body", next(iter(extra))]
    assert len(r.content) < 2000, f"{len(r.content):,} bytes of refusal"


def test_a_422_clips_the_names_the_client_sent_and_lists_at_most_twenty_errors(cfg, gen):
    """A 4 MB key came back whole in `loc`, and a body of 350,000 unknown keys got a 32 MB 422 naming every key."""
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        long_key = c.post("/v1/images", json=edit(**{"<script>" + "k" * 100_000: 1}), headers=AUTH)
        many = c.post("/v1/images", json=edit(**{f"unknown_{i}": 1 for i in range(5_000)}), headers=AUTH)
    assert long_key.status_code == many.status_code == 422
    (detail,) = long_key.json()["detail"]
    assert detail["loc"][1] == "<script>" + "k" * 56 + "... (100,008 characters)"
    assert detail["type"] == "extra_forbidden" and detail["msg"] == "Extra inputs are not permitted"
    assert len(long_key.content) < 2000, f"{len(long_key.content):,} bytes of refusal"
    listed = many.json()["detail"]
    assert len(listed) == 21 and [d["loc"][1] for d in listed[:20]] == [f"unknown_{i}" for i in range(20)]
    assert listed[-1] == {"loc": ["body"], "msg": "4,980 more errors not listed; fix these first",
                          "type": "too_many_errors"}  # fmt: skip
    assert len(many.content) < 5000
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:  # exactly 20: all listed, no "0 more"
        twenty = c.post("/v1/images", json=edit(**{f"unknown_{i}": 1 for i in range(20)}), headers=AUTH)
    assert [d["loc"][1] for d in twenty.json()["detail"]] == [f"unknown_{i}" for i in range(20)]


def test_head_answers_as_get_without_a_body_and_a_body_not_sent_as_json_gets_415(cfg, gen):
    """HEAD on /, /healthz and /metrics was 405 (a load balancer's health check failed); a POST without
    `Content-Type: application/json` got 422 "Input should be a valid dictionary", which hid the cause."""
    body = json.dumps(edit())
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        for url in ("/", "/healthz", "/metrics"):
            head, get = c.head(url), c.get(url)
            assert head.status_code == get.status_code == 200 and head.content == b"", url
            assert head.headers["content-type"] == get.headers["content-type"]
    # What the app sends, below the HTTP client (which drops a HEAD answer's body whatever it gets): no body bytes.
    sent = []

    async def head_healthz():
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "HEAD", "path": "/healthz", "raw_path": b"/healthz", "query_string": b"",
                 "headers": [], "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
                 "root_path": ""}  # fmt: skip
        await create_app(cfg, [KEY], generator=gen)(scope, receive, send)

    asyncio.run(head_healthz())
    assert sent[0]["status"] == 200 and [m["body"] for m in sent[1:]] == [b""]
    assert int(dict(sent[0]["headers"])[b"content-length"]) > 0  # the GET's length, as HEAD answers
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        assert c.head("/v1/adapters").status_code == 401  # the key is asked of HEAD as of GET
        for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
            r = c.post("/v1/images", content=body, headers={**AUTH, **headers})
            assert r.status_code == 415, r.text
            (detail,) = r.json()["detail"]
            assert detail["loc"] == ["header", "content-type"] and detail["msg"].startswith(
                "send the body as JSON with Content-Type: application/json (got "
            )
        assert c.post("/v1/images", content=body, headers={**AUTH, "content-type": "application/json; charset=utf-8"}
                      ).status_code == 200  # fmt: skip
        assert c.post("/v1/images", content=body, headers={"content-type": "text/plain"}).status_code == 401


def _closed_by_server(conn: socket.socket, within: float) -> bool:
    conn.settimeout(within)
    try:
        while chunk := conn.recv(65536):
            if b"HTTP/1.1" in chunk:  # a response: read on to the close
                continue
        return True
    except TimeoutError:
        return False


@contextlib.contextmanager
def _served(cfg, gen):
    """The service on a free local port, in a thread, until the block ends: yields the port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    local = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, host="127.0.0.1", port=port))
    with running(service.make_server(local, [KEY], generator=gen)):
        yield port


def test_slow_or_endless_headers_are_cut_off_and_connections_over_the_cap_closed(cfg, gen, monkeypatch):
    """Connections that never finished their headers stayed open for good: 20,000 ran the service out of file
    descriptors (every client timed out) and asyncio logged a traceback per refused accept."""
    monkeypatch.setattr(service, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(service, "MAX_CONNECTIONS", 3)
    with _served(cfg, gen) as port:
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert _closed_by_server(slow, within=5)
        kept = socket.create_connection(("127.0.0.1", port))  # a second request on a kept-alive connection
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        for _ in range(3):  # trickled, each byte in time for uvicorn's own keep-alive timer
            kept.sendall(b"G")
            time.sleep(0.3)
        assert _closed_by_server(kept, within=5) and time.monotonic() - started < 3
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        over = socket.create_connection(("127.0.0.1", port))
        assert _closed_by_server(over, within=0.4)  # closed as it opened, before the header deadline
        for conn in [slow, kept, over, *idle]:
            conn.close()
        time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert json.loads(answer.read())["status"] == "ok"


def test_a_body_that_stops_or_trickles_is_answered_408_and_its_connection_closed(cfg, gen, monkeypatch):
    """512 connections that declared a body and sent none (or one byte of it) held every slot for good, on an open
    path too: the header deadline had passed, and the guard waited on the body forever. Every client was locked out."""
    monkeypatch.setattr(guards, "BODY_IDLE_S", 0.5)
    monkeypatch.setattr(guards, "BODY_TOTAL_S", 1.5)
    with _served(cfg, gen) as port:
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\nx")
        stalled.settimeout(5)
        started, answer = time.monotonic(), b""
        while chunk := stalled.recv(65536):  # to the server's close
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"the body stopped arriving" in answer
        assert time.monotonic() - started < 3
        trickle = socket.create_connection(("127.0.0.1", port))
        trickle.sendall(f"POST /v1/images HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n"
                        "content-type: application/json\r\ncontent-length: 100\r\n\r\n".encode())  # fmt: skip
        started, answer = time.monotonic(), b""
        with contextlib.suppress(OSError):  # the server may close while a byte is on its way
            while not answer and time.monotonic() - started < 5:
                trickle.sendall(b" ")  # each byte within the pause allowed, never the whole body in time
                time.sleep(0.2)
                trickle.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answer = trickle.recv(65536)
                trickle.setblocking(True)
        assert answer.startswith(b"HTTP/1.1 408") and 1.4 < time.monotonic() - started < 3
        stalled.close(), trickle.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert json.loads(response.read())["status"] == "ok"


@pytest.mark.parametrize("max_side", [2048, 16])  # as decoded, and through the downscale of large inputs
def test_a_16_bit_greyscale_input_keeps_its_tones(tmp_path, max_side):
    grey = (np.arange(24 * 32).reshape(24, 32) * 255 // (24 * 32 - 1)).astype(np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "i16.png")  # mode I;16
    Image.fromarray(grey).save(tmp_path / "l8.png")
    got, want = (
        np.asarray(images_module.load_image(tmp_path / n, max_side=max_side), float) for n in ("i16.png", "l8.png")
    )
    assert got.shape == want.shape and abs(got.mean() - want.mean()) < 1  # was 255: clipped to white


# --------------------------------------------------------------------------------------------- #24 hardening II


@pytest.mark.parametrize("field, value, loc", [
    ("num_inference_steps", True, []), ("seed", False, []), ("width", "64", []), ("guidance_scale", True, []),
    ("quality", "90", []), ("mask_feather", True, []), ("prompt", 5, []),
    ("loras", [{"name": "x", "weight": True}], [0, "weight"]),
])  # fmt: skip
def test_a_json_value_of_another_type_is_refused_not_coerced(cfg, gen, field, value, loc):
    """`"num_inference_steps": true` ran 1 step: a boolean or a string is not a number, a number not a string."""
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        r = c.post("/v1/images", json=edit(**{field: value}), headers=AUTH)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", field, *loc]
        assert (
            c.post("/v1/images", json=edit(guidance_scale=1, width=64), headers=AUTH).status_code == 200
        )  # int is a float


def test_a_nul_byte_or_an_overlong_name_in_a_run_file_path_is_refused_not_a_500(cfg, gen, tmp_path):
    (tmp_path / "runs" / "brand-v1").mkdir(parents=True)
    (tmp_path / "runs" / "brand-v1" / "README.md").write_text("# card\n")
    cfg.serve.runs_dir = str(tmp_path / "runs")
    files = "/v1/runs/brand-v1/files/"
    with TestClient(create_app(cfg, [KEY], generator=gen), raise_server_exceptions=False) as c:
        assert c.get(files + "README.md", headers=AUTH).status_code == 200
        assert c.get(files + "a%00.json", headers=AUTH).status_code == 400  # Path.resolve raised ValueError
        assert c.get(files + "a" * 300 + ".json", headers=AUTH).status_code == 404  # ENAMETOOLONG: no such file
        assert c.get(files + "/".join(["a" * 200] * 30) + ".json", headers=AUTH).status_code == 404


def test_api_docs_are_off_by_default_and_under_the_studio_csp_when_on(cfg, gen):
    """/docs loaded Swagger UI from a public CDN with no CSP, on the studio's origin; the service is offline."""
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert c.get(path, headers=AUTH).status_code == 404, path
        assert c.get("/openapi.json").status_code == 200
    cfg.serve.api_docs = True
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        r = c.get("/docs")  # no key: the page, like the studio's (its requests need one)
        assert c.get("/redoc", headers=AUTH).status_code == 404
    assert r.status_code == 200 and "'/openapi.json'" in r.text
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    policy = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    studio = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    cdn = "https://cdn.jsdelivr.net"
    (inline,) = re.findall(r"<script>(.*?)</script>", r.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert policy["script-src"].split() == ["'self'", cdn, f"'sha256-{digest}'"]  # the CDN and this one inline script
    assert policy["style-src"].split() == ["'self'", cdn]
    assert {k: v for k, v in policy.items() if k not in ("script-src", "style-src")} == {
        k: v for k, v in studio.items() if k not in ("script-src", "style-src")}  # fmt: skip
    assert all(url.startswith(cdn + "/") for url in re.findall(r'(?:src|href)="(https?://[^"]*)"', r.text))


def test_the_stopping_line_counts_in_words():
    assert service.stopping_line(True, 1) == (  # was "1 waiting requests"
        "stopping: finishing the image in progress (Ctrl-C again drops it); 1 waiting request answered 503"
    )
    assert service.stopping_line(False, 3) == "stopping: 3 waiting requests answered 503"
    assert service.stopping_line(False, 0) == "stopping"


def test_the_worker_times_every_job_it_runs_for_retry_after():
    """Only images were timed (in the request path): a service doing layers work kept answering Retry-After: 1."""
    worker = Worker(max_queue=4)
    assert worker.mean_job_seconds is None
    for job in [worker.submit(lambda: time.sleep(0.2)), worker.submit(lambda: 1 / 0)]:  # a refusal is no job's time
        concurrent.futures.wait([job.future])
    assert 0.15 <= worker.mean_job_seconds < 1


def test_the_first_ctrl_c_counts_a_request_still_decoding_among_those_answered_503():
    """Only the queued jobs were counted: a request admitted and still decoding its images when Ctrl-C came was
    refused 503 at its submit but not counted ("1 queued requests answered 503" for two)."""
    worker = Worker(max_queue=4)
    release = block_worker(worker)
    try:
        decoding, queued = worker.admit(), worker.submit(lambda: None)
        assert worker.drain() == 2 and queued.future.cancelled()
        with pytest.raises(Stopping):
            worker.submit(lambda: None, decoding)
    finally:
        release.set()


def test_the_first_ctrl_c_answers_the_queued_requests_and_the_second_stops_at_once(cfg, gen, monkeypatch, capsys):
    """uvicorn alone ran every queued job before exiting, silently (a minute for four), and a second Ctrl-C printed a
    traceback per request and aborted (status 134) with the model thread still running."""
    server = service.make_server(cfg, [KEY], generator=gen)
    app = server.config.app
    worker = app.state.worker
    release = block_worker(worker)
    body, headers = json.dumps(edit()).encode(), [(b"x-api-key", KEY.encode())]

    async def main():
        queued = [asyncio.ensure_future(call(app, body, headers)) for _ in range(2)]
        await until(lambda: worker.waiting == 2, "two requests queued behind the running job")
        server.handle_exit(signal.SIGINT, None)
        answered = await asyncio.wait_for(asyncio.gather(*queued), 30)  # at once, not after the running job
        return answered, await call(app, body, headers)

    try:
        answered, late = asyncio.run(main())
    finally:
        release.set()
    assert [status for status, *_ in answered] == [503, 503] and late[0] == 503
    assert "the service is stopping" in json.loads(answered[0][1])["detail"][0]["msg"]
    assert server.should_exit and capsys.readouterr().err.splitlines()[-1] == (
        "stopping: finishing the image in progress (Ctrl-C again drops it); 2 waiting requests answered 503"
    )
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    server.handle_exit(signal.SIGINT, None)
    assert exits == [130] and "stopped: the image in progress was dropped" in capsys.readouterr().err
