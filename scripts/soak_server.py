"""Soak the HTTP service on loopback with large inputs of every accepted format; report, per format, the server's peak
memory against the bound admission promises, and its idle memory after the load, as JSON.

    python scripts/soak_server.py                      # tiny random model, 2 random adapters, CPU
    python scripts/soak_server.py --formats lossless-webp --requests 64 --concurrency 32

Starts `qwen-lora serve` as a child process on 127.0.0.1 (nothing else is contacted). For each format (8-bit grey PNG,
JPEG, 1-bit PNG, palette PNG with transparency, 16-bit grey PNG, lossless WebP: each a disc on white, 8000x8000 when
decoded and small on disk; and a 5000x5000 lossless WebP, whose decode fits the budget) it sends `--requests` edits of that image, `--concurrency` at once, to a queue of
`--max-queue` (a 429 is retried after its `Retry-After`), adapters varied. The server's RSS (VmRSS) is sampled every
20 ms: at the start (model loaded, idle), the peak of each format's phase, and idle again after it. Everything ends by
`--time-limit` seconds.

The bound is what admission promises: the idle server + the decode budget (`guards.DECODE_BUDGET_BYTES`: what
concurrent decodes may hold, each counted from its header by `images.decode_cost`, the decoded frame included) +
(`max_queue` + 1) requests' bodies and decoded inputs + the bodies of the other requests in flight (read before their
429). An input whose decode alone would not fit the budget gets 413 before a pixel is decoded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.guards import DECODE_BUDGET_BYTES
from qwen_image_lora.inference.testing import make_random_lora
from qwen_image_lora.tiny_model import make_tiny_model

KEY = "soak-key"
FORMATS = ("grey-png", "jpeg", "bilevel-png", "palette-png", "grey16-png", "lossless-webp", "lossless-webp-5000")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model folder (default: a freshly built tiny model)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--requests", type=int, default=32, help="edits per format; a 429 is retried (Retry-After)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--side", type=int, default=8000, help="side of each input image (decoded pixels)")
    p.add_argument("--time-limit", type=float, default=1200.0, help="seconds for the whole run, start-up included")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.time_limit

    tmp = Path(tempfile.mkdtemp(prefix="soak-server-"))
    model, adapters = _model_and_adapters(args.model, tmp)
    # Encoded before the server starts, so none of it is in the server's RSS.
    inputs = {name: _encoded(name, 5000 if name.endswith("-5000") else args.side) for name in args.formats}
    port = _free_port()
    config = tmp / "serve.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"pretrained": str(model), "dtype": "float32"}, "data": {"resolution": 64},
        "serve": {"host": "127.0.0.1", "port": port, "max_queue": args.max_queue, "max_steps": 2,
                  "adapters": [{"name": name, "path": str(path), "weight": 0.8} for name, path in adapters.items()]},
    }))  # fmt: skip
    env = {**os.environ, "QWEN_LORA_API_KEYS": KEY}
    server = subprocess.Popen([sys.executable, "-m", "qwen_image_lora.cli", "serve", "--config", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    sampler, phases = None, {}
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, server, deadline)
        sampler = _RSSSampler(server.pid)
        start_mb = sampler.sample()
        for name, data in inputs.items():
            sampler.peak = sampler.sample()
            b64 = base64.b64encode(data).decode()
            results = asyncio.run(_load(base, _bodies(args.requests, b64, list(adapters)), args.concurrency, deadline))
            peak_mb = sampler.peak
            time.sleep(2.0)  # idle again: what the server keeps after the load
            ok = [s for code, s in results if code == 200]
            # The promise: decodes within the budget, admitted requests' bodies and inputs, bodies of the rest in flight.
            bound_mb = (start_mb + DECODE_BUDGET_BYTES / 2**20 + (args.max_queue + 1) * _per_request_mb(b64)
                        + (args.concurrency - args.max_queue - 1) * 3 * len(b64) / 2**20)  # fmt: skip
            phases[name] = {
                "input_kb": round(len(data) / 1024), "status": dict(sorted(collections.Counter(str(c) for c, _ in results).items())),
                "latency_200_s": {"p50": _pct(ok, 50), "p99": _pct(ok, 99), "n": len(ok)},
                "rss_peak_mb": round(peak_mb), "bound_mb": round(bound_mb), "within_bound": peak_mb <= bound_mb,
                "rss_idle_after_mb": round(sampler.sample()),
            }  # fmt: skip
        end_mb = sampler.sample()
        metrics = _get(f"{base}/metrics")
    finally:
        if sampler is not None:
            sampler.stop()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    report = {
        "side": args.side, "requests_per_format": args.requests, "concurrency": args.concurrency, "max_queue": args.max_queue,
        "decode_budget_mb": round(DECODE_BUDGET_BYTES / 2**20), "server_rss_start_mb": round(start_mb),
        "server_rss_end_mb": round(end_mb), "formats": phases,
        "server_5xx": sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                          if line.startswith("qwen_lora_http_responses_total") and 'code="5' in line),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0 if all(ph["within_bound"] for ph in phases.values()) and not report["server_5xx"] else 1


def _encoded(name: str, side: int) -> bytes:
    """A dark disc on white, `side` x `side`, in the named format: each decodes to a large frame from a small file."""
    grey = Image.new("L", (side, side), 255)
    ImageDraw.Draw(grey).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=40)
    image, fmt, options = {
        "grey-png": (grey, "PNG", {"optimize": True}),
        "jpeg": (grey.convert("RGB"), "JPEG", {"quality": 75}),
        "bilevel-png": (grey.convert("1", dither=Image.Dither.NONE), "PNG", {"optimize": True}),
        "palette-png": (grey.convert("P"), "PNG", {"transparency": 255, "optimize": True}),  # white is transparent
        "grey16-png": (grey.convert("I").point(lambda v: v * 257).convert("I;16"), "PNG", {}),
        "lossless-webp": (grey.convert("RGB"), "WEBP", {"lossless": True}),
    }[name.removesuffix("-5000")]  # fmt: skip
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _model_and_adapters(model: str | None, tmp: Path):
    if model is None:
        model = make_tiny_model(tmp / "tiny")
    gen = Generator.from_pretrained(str(model), "float32", "cpu", resolution=64)
    adapters = {
        name: make_random_lora(gen.pipe.transformer, tmp / name, seed=i) for i, name in enumerate(["brand", "sketch"])
    }
    return model, adapters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    return httpx.get(url, timeout=10).text


def _wait_ready(base: str, server: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{server.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start within --time-limit")


def _bodies(n: int, image: str, adapters: list[str]) -> list[dict]:
    loras = [None, [], [{"name": adapters[0]}], [{"name": adapters[1], "weight": 0.5}], [{"name": a} for a in adapters]]
    bodies = []
    for i in range(n):
        body = {"prompt": f"a bottle on white, {i}", "image": image, "num_inference_steps": 1, "seed": i}
        if loras[i % len(loras)] is not None:
            body["loras"] = loras[i % len(loras)]
        bodies.append(body)
    return bodies


async def _load(base: str, bodies: list[dict], concurrency: int, deadline: float) -> list[tuple[int, float]]:
    """Each body is sent until it is answered with something other than 429 (retried after `Retry-After`, as a
    well-behaved client does) or the deadline passes. Returns (status, seconds) for every attempt."""
    limit = asyncio.Semaphore(concurrency)
    attempts = []
    async with httpx.AsyncClient(base_url=base, timeout=max(1.0, deadline - time.monotonic())) as client:

        async def one(body):
            async with limit:
                while time.monotonic() < deadline:
                    start = time.perf_counter()
                    try:
                        r = await client.post("/v1/images", json=body, headers={"x-api-key": KEY})
                        code = r.status_code
                    except httpx.HTTPError:
                        code = 0  # no answer (a timeout at the deadline)
                    attempts.append((code, time.perf_counter() - start))
                    if code != 429:
                        return
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))

        await asyncio.gather(*(one(b) for b in bodies))
    return attempts


def _per_request_mb(body_b64: str) -> float:
    """One admitted request's working set: the JSON body held by the server about 3 times (bytes, parsed string,
    decoded image bytes) plus its decoded input at the working size (2048x2048 RGBA, 4 bytes a pixel)."""
    return (3 * len(body_b64) + 2048 * 2048 * 4) / 2**20


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


class _RSSSampler:
    """VmRSS of a process, every 20 ms, on a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            mb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        self.peak = max(self.peak, mb)
        return mb

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.sample()
            except (OSError, StopIteration):
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return self.peak


if __name__ == "__main__":
    sys.exit(main())
