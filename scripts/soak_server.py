"""Soak the HTTP service on loopback and report latency, status counts and the server's memory as JSON.

    python scripts/soak_server.py                      # tiny random model, 2 random adapters, CPU
    python scripts/soak_server.py --requests 200 --concurrency 32 --max-queue 8

Starts `qwen-lora serve` as a child process on 127.0.0.1 (nothing else is contacted), sends a bounded number of
requests (`--requests`, `--concurrency` of them at once: several times `--max-queue`; a 429 is retried after its
`Retry-After`) mixing small edits, large-image edits (a ~90 KB PNG that
decodes to 8192x8192) and text-to-image with mixed adapters, then stops the server. Everything ends by
`--time-limit` seconds. The server's RSS (VmRSS of its process) is sampled throughout: start (model loaded, idle),
peak, and end (idle again after the load). `bound_mb` is what admission promises: the idle server plus, at most,
`MAX_CONCURRENT_DECODES` full-size decode frames plus `max_queue + 1` requests' bodies and decoded inputs.
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

KEY = "soak-key"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model folder (default: a freshly built tiny model)")
    p.add_argument("--requests", type=int, default=48, help="distinct requests; a 429 is retried (Retry-After)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--large-side", type=int, default=8192, help="side of the large input image (decoded pixels)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole run, start-up included")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.time_limit

    tmp = Path(tempfile.mkdtemp(prefix="soak-server-"))
    model, adapters = _model_and_adapters(args.model, tmp)
    port = _free_port()
    config = tmp / "serve.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"pretrained": str(model), "dtype": "float32"},
        "serve": {"host": "127.0.0.1", "port": port, "max_queue": args.max_queue, "resolution": 64, "max_steps": 2,
                  "adapters": [{"name": name, "path": str(path), "weight": 0.8} for name, path in adapters.items()]},
    }))  # fmt: skip
    env = {**os.environ, "QWEN_LORA_API_KEYS": KEY}
    server = subprocess.Popen([sys.executable, "-m", "qwen_image_lora.cli", "serve", "--config", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    sampler = None
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, server, deadline)
        sampler = _RSSSampler(server.pid)
        start_mb = sampler.sample()
        small, large = _png_b64((96, 64), "RGB"), _png_b64((args.large_side, args.large_side), "L")
        bodies = _bodies(args.requests, small, large, list(adapters))
        results = asyncio.run(_load(base, bodies, args.concurrency, deadline))
        time.sleep(1.0)  # idle again: what the server keeps after the load
        end_mb = sampler.sample()
        peak_mb = sampler.stop()
        metrics = _get(f"{base}/metrics")
    finally:
        if sampler is not None:
            sampler.stop()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    per_request_mb = _per_request_mb(large, args.large_side)
    from qwen_image_lora.inference.server import MAX_CONCURRENT_DECODES

    frame_mb = args.large_side**2 / 2**20  # one full-size greyscale frame while it is reduced
    bound_mb = start_mb + MAX_CONCURRENT_DECODES * frame_mb + (args.max_queue + 1) * per_request_mb
    ok = [s for code, s in results if code == 200]
    report = {
        "requests": args.requests,
        "attempts": len(results),
        "concurrency": args.concurrency,
        "max_queue": args.max_queue,
        "status": dict(sorted(collections.Counter(str(code) for code, _ in results).items())),
        "latency_200_s": {"p50": _pct(ok, 50), "p99": _pct(ok, 99), "n": len(ok)},
        "latency_all_s": {"p50": _pct([s for _, s in results], 50), "p99": _pct([s for _, s in results], 99)},
        "server_rss_mb": {"start": round(start_mb), "peak": round(peak_mb), "end": round(end_mb)},
        "bound_mb": round(bound_mb),
        "within_bound": peak_mb <= bound_mb,
        "large_input": {"png_kb": round(len(base64.b64decode(large)) / 1024), "decoded": f"{args.large_side}x{args.large_side}"},
        "server_5xx": sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                          if line.startswith("qwen_lora_http_responses_total") and 'code="5' in line),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0 if report["within_bound"] and not report["server_5xx"] else 1


def _model_and_adapters(model: str | None, tmp: Path):
    from qwen_image_lora.inference.generator import Generator
    from qwen_image_lora.inference.testing import make_random_lora

    if model is None:
        from qwen_image_lora.tiny_model import make_tiny_model

        model = make_tiny_model(tmp / "tiny")
    gen = Generator.from_pretrained(str(model), "float32", "cpu", resolution=64)
    adapters = {name: make_random_lora(gen.pipe.transformer, tmp / name, seed=i) for i, name in enumerate(["brand", "sketch"])}
    return model, adapters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=10).text


def _wait_ready(base: str, server: subprocess.Popen, deadline: float) -> None:
    import httpx

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


def _png_b64(size: tuple[int, int], mode: str) -> str:
    from PIL import Image, ImageDraw

    image = Image.new(mode, size, "white")
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill="black")  # a product on white: compresses well
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def _bodies(n: int, small: str, large: str, adapters: list[str]) -> list[dict]:
    loras = [None, [], [{"name": adapters[0]}], [{"name": adapters[1], "weight": 0.5}], [{"name": a} for a in adapters]]
    bodies = []
    for i in range(n):
        body = {"prompt": f"a bottle on white, {i}", "num_inference_steps": 1, "seed": i}
        kind = i % 3  # small edit, large edit, text-to-image
        if kind < 2:
            body["image"] = small if kind == 0 else large
        else:
            body.update(width=64, height=64)
        if loras[i % len(loras)] is not None:
            body["loras"] = loras[i % len(loras)]
        bodies.append(body)
    return bodies


async def _load(base: str, bodies: list[dict], concurrency: int, deadline: float) -> list[tuple[int, float]]:
    """Each body is sent until it is answered with something other than 429 (retried after `Retry-After`, as a
    well-behaved client does) or the deadline passes. Returns (status, seconds) for every attempt."""
    import httpx

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


def _per_request_mb(large: str, side: int) -> float:
    """One large request's working set: the JSON body held by the server about 3 times (bytes, parsed string,
    decoded PNG bytes) plus its decoded input at the working size (2048x2048 RGB, 4 bytes a pixel)."""
    working = min(side, 2048) ** 2 * 4
    return (3 * len(large) + working) / 2**20


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
