"""HTTP service: `POST /v1/images` (text-to-image and editing, shaped like hosted image-edit APIs), `/healthz`,
`/metrics` (Prometheus text), `/openapi.json`.

One model worker thread owns the pipeline and takes jobs from a bounded queue (`serve.max_queue`); a full queue
answers 429 at once. Requests carry `x-api-key`, compared in constant time. Limits: body size (413), decoded
pixels (inputs over 2048x2048 are downscaled, decompression bombs get 413), steps/guidance/size ranges (422 naming
the field), image URLs (http(s) only, private/loopback/link-local/reserved targets refused — see `urls.py`).
Adapters come from `serve.adapters`, loaded at start; each request selects its own (no state carries over).
"""

# No `from __future__ import annotations` here: FastAPI must see the request model (built per app, from the
# config's limits) as a real class in the endpoint's signature.
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

from qwen_image_lora.config import Config, ServeConfig
from qwen_image_lora.inference.generator import ASPECT_RATIOS, MAX_INPUT_IMAGES, GenerationRequest, Generator
from qwen_image_lora.inference.images import MEDIA_TYPES, ImageInputError, decode_image, encode_image, format_for
from qwen_image_lora.inference.studio import studio_router
from qwen_image_lora.inference.urls import URLRefused, fetch

log = logging.getLogger("qwen_image_lora.server")
MAX_PROMPT_CHARS = 20_000  # a cheap bound before the 1,024-token check with the model's tokenizer


class RequestError(Exception):
    """An answer other than 200, with the field it is about (FastAPI's 422 shape: detail[].loc/msg)."""

    def __init__(self, status: int, msg: str, loc: tuple = ("body",), headers: dict | None = None):
        super().__init__(msg)
        self.status, self.msg, self.loc, self.headers = status, msg, loc, headers

    def body(self) -> dict:
        return {"detail": [{"loc": list(self.loc), "msg": self.msg, "type": "value_error"}]}


# --------------------------------------------------------------------------------------------- keys


def load_api_keys(serve: ServeConfig, environ) -> list[str]:
    """Keys from the env var named by `serve.api_keys_env` (comma-separated) and/or `serve.api_keys_file` (one
    per line, # comments). The CLI calls this; the app itself never reads the environment."""
    keys = [k.strip() for k in environ.get(serve.api_keys_env, "").split(",") if k.strip()]
    if serve.api_keys_file:
        for line in Path(serve.api_keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    if not keys:
        raise ValueError(
            f"serve: no API keys; set {serve.api_keys_env}=key1,key2 or serve.api_keys_file (requests need x-api-key)"
        )
    return keys


class KeyCheck:
    """Constant-time comparison: digests of equal length, every key compared, no early exit."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __call__(self, presented: str | None) -> bool:
        digest = hashlib.sha256((presented or "").encode()).digest()
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        return ok and bool(presented)


# --------------------------------------------------------------------------------------------- worker


class Worker:
    """One thread owns the pipeline; `submit` raises queue.Full when `max_queue` jobs already wait.
    `start`/`stop` follow the app's lifespan; the thread also starts at construction, for servers that skip it."""

    def __init__(self, max_queue: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.busy = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.start()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            if not self._stop.is_set():
                return
            self._thread.join(timeout=60)  # a stopped thread finishes its current job, then exits
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="qwen-lora-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait((None, None))  # wake the thread if it is idle

    def submit(self, fn) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put_nowait((future, fn))
        if self._stop.is_set() or not self._thread.is_alive():  # an app served again after a shutdown
            self.start()
        return future

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            future, fn = self.queue.get()
            if future is None or not future.set_running_or_notify_cancel():
                continue
            self.busy = True
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the request that submitted it
                future.set_exception(e)
            finally:
                self.busy = False


class Metrics:
    """Hand-written Prometheus counters (text exposition format 0.0.4)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.responses: dict[tuple[str, int], int] = {}
        self.images = 0
        self.seconds_sum = 0.0
        self.rejected_queue_full = 0

    def count_response(self, path: str, status: int) -> None:
        with self._lock:
            self.responses[(path, status)] = self.responses.get((path, status), 0) + 1

    def count_image(self, seconds: float) -> None:
        with self._lock:
            self.images += 1
            self.seconds_sum += seconds

    def render(self, worker: Worker) -> str:
        with self._lock:
            lines = ["# HELP qwen_lora_http_responses_total HTTP responses by path and status code.",
                     "# TYPE qwen_lora_http_responses_total counter"]  # fmt: skip
            for (path, status), n in sorted(self.responses.items()):
                lines.append(f'qwen_lora_http_responses_total{{path="{path}",code="{status}"}} {n}')
            lines += [
                "# HELP qwen_lora_images_total Images generated.",
                "# TYPE qwen_lora_images_total counter",
                f"qwen_lora_images_total {self.images}",
                "# HELP qwen_lora_generation_seconds Time in the pipeline per image.",
                "# TYPE qwen_lora_generation_seconds summary",
                f"qwen_lora_generation_seconds_sum {self.seconds_sum:.6f}",
                f"qwen_lora_generation_seconds_count {self.images}",
                "# HELP qwen_lora_rejected_total Requests refused because the queue was full.",
                "# TYPE qwen_lora_rejected_total counter",
                f'qwen_lora_rejected_total{{reason="queue_full"}} {self.rejected_queue_full}',
                "# HELP qwen_lora_queue_depth Jobs waiting for the model worker.",
                "# TYPE qwen_lora_queue_depth gauge",
                f"qwen_lora_queue_depth {worker.queue.qsize()}",
                "# HELP qwen_lora_worker_busy 1 while the model worker is generating.",
                "# TYPE qwen_lora_worker_busy gauge",
                f"qwen_lora_worker_busy {int(worker.busy)}",
            ]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- ASGI guards


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """Counts every response for /metrics and refuses bodies over the limit with 413 before
    FastAPI parses anything (Content-Length checked first; chunked bodies counted as they arrive)."""

    PATHS = ("/v1/images", "/healthz", "/metrics", "/openapi.json")

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.PATHS else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_response(path, message["status"])
            await send(message)

        limit = self.max_body_bytes
        too_big = {"detail": [{"loc": ["body"], "msg": f"request body over {limit:,} bytes (serve.max_body_mb)", "type": "too_large"}]}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            status = 413 if declared.isdigit() else 400
            return await _send_json(counted_send, status, too_big if status == 413 else {"detail": "bad Content-Length"})
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _send_json(counted_send, 413, too_big)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, counted_send)


# --------------------------------------------------------------------------------------------- the app


def request_models(serve: ServeConfig):
    """The request schema, with this deployment's limits in it (so /openapi.json shows them)."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class LoraRef(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(min_length=1, max_length=128, description="an adapter from serve.adapters")
        weight: float | None = Field(None, ge=-4.0, le=4.0, allow_inf_nan=False, description="default: the configured weight")

    ImageStr = Annotated[str, Field(min_length=1, description="http(s) URL, base64, or a data: URL")]

    class ImageRequest(BaseModel):
        """Text-to-image when `image` is absent; an edit of 1 to 10 input images otherwise."""

        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="up to 1,024 tokens")
        image: ImageStr | Annotated[list[ImageStr], Field(min_length=1, max_length=MAX_INPUT_IMAGES)] | None = None
        negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
        num_inference_steps: int | None = Field(None, ge=1, le=serve.max_steps, description="default: the pipeline's")
        guidance_scale: float | None = Field(
            None, ge=0.0, le=serve.max_guidance_scale, allow_inf_nan=False,
            description="the pipeline's true_cfg_scale; acts only with a negative_prompt and a value > 1",
        )  # fmt: skip
        seed: int | None = Field(None, ge=0, le=2**63 - 1, description="default: random, returned in x-seed")
        aspect_ratio: Literal[tuple(ASPECT_RATIOS)] | None = None  # type: ignore[valid-type]
        width: int | None = Field(None, ge=32, le=serve.max_side, multiple_of=32)
        height: int | None = Field(None, ge=32, le=serve.max_side, multiple_of=32)
        loras: list[LoraRef] | None = Field(
            None, max_length=16, description="omitted: every configured adapter at its weight; []: the base model"
        )
        output_format: Literal["png", "jpeg", "webp"] = "png"
        quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality")
        response_format: Literal["bytes", "b64_json"] = "bytes"

        @model_validator(mode="after")
        def _one_way_to_size(self):
            if self.aspect_ratio is not None and (self.width is not None or self.height is not None):
                raise ValueError("give either aspect_ratio or width/height, not both")
            return self

    return ImageRequest, LoraRef


def create_app(cfg: Config, api_keys: list[str], generator: Generator | None = None):
    """Build the service. Loads the model (unless `generator` is given) and the configured adapters now."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from fastapi.security import APIKeyHeader
    from starlette.concurrency import run_in_threadpool

    serve = cfg.serve
    if not api_keys:
        raise ValueError("serve: at least one API key is required")
    if generator is None:
        generator = Generator.from_pretrained(cfg.model.pretrained, cfg.model.dtype, resolution=serve.resolution,
                                              revision=cfg.model.revision)  # fmt: skip
    for adapter in serve.adapters:
        if adapter.name not in generator.adapters.loaded:
            generator.adapters.load(adapter.path, name=adapter.name or None, weight=adapter.weight)
    configured = {a.name: a.weight for a in serve.adapters}

    ImageRequest, _ = request_models(serve)
    check_key = KeyCheck(api_keys)
    metrics, worker = Metrics(), Worker(serve.max_queue)
    key_header = APIKeyHeader(name="x-api-key", auto_error=False, description="one of the service's API keys")

    def require_key(key: str | None = Depends(key_header)) -> None:
        if not check_key(key):
            raise RequestError(401, "missing or wrong x-api-key", ("header", "x-api-key"), {"WWW-Authenticate": "ApiKey"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="qwen-image-lora", version="1", description=__doc__, lifespan=lifespan)
    app.add_middleware(GuardMiddleware, max_body_bytes=int(serve.max_body_mb * 2**20), metrics=metrics)
    app.state.worker, app.state.metrics, app.state.generator = worker, metrics, generator

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    image_responses = {
        200: {"description": "the image (bytes) or JSON with base64 (response_format=b64_json)",
              "content": {**{m: {} for m in MEDIA_TYPES.values()}, "application/json": {}}},
        401: {"description": "missing or wrong x-api-key"},
        413: {"description": "request body or decoded image too large"},
        422: {"description": "a field out of range or unreadable; detail[].loc names it"},
        429: {"description": "the queue is full; retry later"},
    }  # fmt: skip

    @app.post("/v1/images", responses=image_responses, dependencies=[Depends(require_key)])
    async def images(body: ImageRequest):
        inputs = await run_in_threadpool(_decode_inputs, body, serve)
        adapters = _select_adapters(body, configured, generator)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        request = GenerationRequest(
            prompt=body.prompt, images=inputs, negative_prompt=body.negative_prompt, width=body.width,
            height=body.height, aspect_ratio=body.aspect_ratio, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, seed=seed, adapters=adapters,
        )  # fmt: skip
        fmt = format_for(body.output_format)

        def job():
            try:
                generator.check(request)  # the tokenizer is used on the worker thread only
            except ValueError as e:
                field = {"images": "image"}.get(str(e).split(":", 1)[0], str(e).split(":", 1)[0])
                raise RequestError(422, str(e), ("body", field) if field in ImageRequest.model_fields else ("body",))
            start = time.perf_counter()
            image = generator.generate(request)
            metrics.count_image(time.perf_counter() - start)
            return image, encode_image(image, fmt, body.quality)

        try:
            future = worker.submit(job)
        except queue.Full:
            metrics.rejected_queue_full += 1
            raise RequestError(429, f"busy: {serve.max_queue} requests already queued; retry later", (), {"Retry-After": "1"})
        image, data = await _wait(future)
        headers = {"x-seed": str(seed)}
        if body.response_format == "b64_json":
            payload = {"data": [{"b64_json": base64.b64encode(data).decode(), "seed": seed, "width": image.width,
                                 "height": image.height}], "output_format": body.output_format}  # fmt: skip
            return JSONResponse(payload, headers=headers)
        return Response(data, media_type=MEDIA_TYPES[fmt], headers=headers)

    app.include_router(studio_router(cfg, require_key, generator))  # the page at / and its read-only endpoints

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "adapters": generator.adapters.names, "queue": worker.queue.qsize(), "max_queue": serve.max_queue}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(worker), media_type="text/plain; version=0.0.4")

    return app


async def _wait(future: concurrent.futures.Future):
    import asyncio

    try:
        return await asyncio.wrap_future(future)
    except RequestError:
        raise
    except Exception:
        log.exception("generation failed")
        raise


def _decode_inputs(body, serve: ServeConfig) -> list:
    """Each `image` entry (URL, base64 or data: URL) -> a PIL image; errors name `image[i]`."""
    items = [] if body.image is None else [body.image] if isinstance(body.image, str) else list(body.image)
    out = []
    for i, item in enumerate(items):
        loc = ("body", "image") if isinstance(body.image, str) else ("body", "image", i)
        try:
            if item.startswith(("http://", "https://")) or "://" in item[:16]:
                data = fetch(item, allow_private=serve.allow_private_urls, timeout_s=serve.url_timeout_s,
                             max_bytes=int(serve.max_url_mb * 2**20))  # fmt: skip
            else:
                payload = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
                try:
                    data = base64.b64decode(payload, validate=True)
                except (binascii.Error, ValueError) as e:
                    raise ImageInputError(f"not an http(s) URL and not valid base64 ({e})") from e
            out.append(decode_image(data))
        except (URLRefused, ImageInputError) as e:
            raise RequestError(413 if e.too_large else 422, str(e), loc) from e
    return out


def _select_adapters(body, configured: dict[str, float], generator: Generator) -> dict[str, float]:
    if body.loras is None:
        return dict(configured)
    known = generator.adapters.names
    chosen = {}
    for i, ref in enumerate(body.loras):
        if ref.name not in known:
            raise RequestError(422, f"unknown adapter {ref.name!r}; known adapters: {', '.join(known) or 'none'}",
                               ("body", "loras", i, "name"))  # fmt: skip
        chosen[ref.name] = ref.weight if ref.weight is not None else configured.get(ref.name, 1.0)
    return chosen


def serve(cfg: Config, api_keys: list[str]) -> None:
    import uvicorn

    app = create_app(cfg, api_keys)
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")
