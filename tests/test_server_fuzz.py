"""Robustness: a schema fuzz (schemathesis against /openapi.json) finds no 5xx, and a loopback load test against a
real uvicorn loses no request (every one answered 200 or 429)."""

import asyncio
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from qwen_image_lora.config import Config
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.server import create_app

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    cfg = Config()
    cfg.model.pretrained = str(tiny_model_dir)
    cfg.data.resolution = 64
    cfg.serve.max_steps = 2
    cfg.serve.max_side = 128
    cfg.serve.max_queue = 8
    gen = Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)
    gen.default_steps = 1  # requests that omit steps would otherwise run the pipeline's 40
    return create_app(cfg, [KEY], generator=gen)


def test_schema_fuzz_finds_no_server_error(app):
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=40 if op.path == "/v1/images" else 5, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=op.as_strategy())
        def check(case):
            case.headers = {**(case.headers or {}), "x-api-key": KEY}
            response = case.call()
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:300]))

        check()
    assert not failures


def test_loopback_load_200_requests_16_concurrent_none_lost(app):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started

    async def run():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            async def one(i):
                async with limit:
                    body = {"prompt": f"bottle {i}", "num_inference_steps": 1, "seed": i, "width": 64, "height": 64}
                    r = await client.post("/v1/images", json=body, headers={"x-api-key": KEY})
                    return r.status_code

            return await asyncio.gather(*(one(i) for i in range(200)))

    try:
        codes = asyncio.run(run())
    finally:
        server.should_exit = True
        thread.join(10)
    assert len(codes) == 200
    assert set(codes) <= {200, 429}, sorted(set(codes))
    assert codes.count(200) >= 8  # the queue drained while the load was on
