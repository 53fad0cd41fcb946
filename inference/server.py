"""HTTP service: `POST /v1/images` (text-to-image and editing, shaped like hosted image-edit APIs), `/healthz`,
`/metrics` (Prometheus text), `/openapi.json`.

A request passes, in order: the key and body-size guards (`guards.py`, before the body is read), the schema (422
naming the field), admission to the queue (`worker.py`: 429 at once when `serve.max_queue` requests already wait,
before any image is decoded), the decode of its inputs (at most `MAX_CONCURRENT_DECODES` at once, straight to the
working size), then the model worker. Limits: body size (413), decoded pixels (inputs larger than `serve.max_side`
are downscaled, decompression bombs get 413), steps/guidance/size ranges (422), image URLs (http(s) only,
private/loopback/link-local/reserved targets refused — see `urls.py`). Adapters come from `serve.adapters`, loaded
at start; each request selects its own (no state carries over).
"""

# No `from __future__ import annotations` here: FastAPI must see the request model (built per app, from the
# config's limits) as a real class in the endpoint's signature.
import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from typing import NamedTuple

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_image_lora.config import Config
from qwen_image_lora.console import counted
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import MEDIA_TYPES, encode_image, format_for, settings_as_written
from qwen_image_lora.images import MAX_INPUT_SIDE, ImageInputError, decode_cost, decode_image, identify
from qwen_image_lora.inference import layers as layer_output
from qwen_image_lora.inference import mask_rules
from qwen_image_lora.inference.generator import GenerationRequest, Generator, InputRecord, bytes_record
from qwen_image_lora.inference.guards import DecodeGate, GuardMiddleware, KeyCheck, RequestError, validation_error_body
from qwen_image_lora.inference.metrics import Metrics
from qwen_image_lora.inference.requests import exact_limits, request_models
from qwen_image_lora.inference.studio import studio_router
from qwen_image_lora.inference.urls import URLRefused, fetch
from qwen_image_lora.inference.worker import Stopping, Worker
from qwen_image_lora.io import DuplicateKey, unique_keys
from qwen_image_lora.knobs import repeated_name, unused_settings
from qwen_image_lora.serve_config import ServeConfig

log = logging.getLogger("qwen_image_lora.server")
MAX_CONCURRENT_DECODES = 2  # input images decoded at once (each briefly holds its full-size frame)
CLIENT_GONE = 499  # nginx's code for "client closed request": counted in /metrics, never seen by the client
STOPPING = "the service is stopping (Ctrl-C or SIGTERM); send the request again once it is back, or to another one"
UNPARSED = "the body could not be read as JSON: send UTF-8 JSON, uncompressed (no Content-Encoding), not nested deeply"


# --------------------------------------------------------------------------------------------- the app


def create_app(cfg: Config, api_keys: list[str], generator: Generator | None = None):
    """Build the service. Loads the model (unless `generator` is given) and the configured adapters now."""

    serve = cfg.serve
    if not api_keys:
        raise InputError("serve: at least one API key is required", "serve.api_keys_env")
    if generator is None:
        generator = Generator.from_config(cfg.model, resolution=cfg.data.resolution)
    configured = {}  # by the name each adapter loaded under: an unnamed one's is derived from its path
    for adapter in serve.adapters:
        name = adapter.name
        if name not in generator.adapters.loaded:
            name = generator.adapters.load(adapter.path, name=adapter.name or None, weight=adapter.weight)
        configured[name] = adapter.weight
    seconds = generator.warm_up()  # a compiled model compiles now, not in the first user's request
    if seconds:
        log.info("serve: warm-up compiled the transformer in %.1f s", seconds)

    ImageRequest, LayersRequest = request_models(serve)
    worker, gate = Worker(serve.max_queue), DecodeGate(MAX_CONCURRENT_DECODES)
    metrics = Metrics(worker, gate)
    # Documents the key in /openapi.json; GuardMiddleware checks it, from the headers, before the body is read.
    key_header = APIKeyHeader(name="x-api-key", auto_error=False, description="one of the service's API keys")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    # No FastAPI /docs or /redoc: they load from a public CDN with no CSP; studio.py serves /docs when serve.api_docs.
    app = FastAPI(title="qwen-image-lora", version="1", description=__doc__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)  # fmt: skip
    app.router.route_class = _UniqueKeysRoute
    app.add_middleware(GuardMiddleware, max_body_bytes=int(serve.max_body_mb * 2**20), metrics=metrics,
                       check_key=KeyCheck(api_keys))  # fmt: skip
    exact_limits(app, ImageRequest, LayersRequest)
    app.state.worker, app.state.metrics, app.state.generator, app.state.decodes = worker, metrics, generator, gate

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(validation_error_body(exc.errors()), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own refusals in the shape of every other (detail[].loc/msg): a body FastAPI could not parse
        was a bare "There was an error parsing the body" naming no cause (nested too deep, not UTF-8, compressed)."""
        said = UNPARSED if exc.detail == "There was an error parsing the body" else str(exc.detail)
        loc = ("body",) if exc.status_code in (400, 422) else ()
        return JSONResponse(RequestError(exc.status_code, said, loc).body(), exc.status_code, exc.headers)

    image_responses = {
        200: {"description": "the image (bytes) or JSON with base64 (response_format=b64_json)",
              "content": {**{m: {} for m in MEDIA_TYPES.values()}, "application/json": {}}},
        401: {"description": "missing or wrong x-api-key (or Authorization: Bearer)"},
        413: {"description": "request body or decoded image too large"},
        422: {"description": "a field out of range or unreadable; detail[].loc names it"},
        429: {"description": "the queue is full; retry later"},
    }  # fmt: skip

    async def admitted(request: Request, decode, work):
        """Take a queue slot before decoding anything, decode (bounded), run `work(decoded)` on the worker; a client
        that leaves before its job starts frees the slot and the job never runs."""
        try:
            slot = worker.admit()  # before any decoding: a refused request costs nothing
        except queue.Full:
            metrics.count_rejected()
            busy = f"busy: {counted(serve.max_queue, 'request')} already queued; retry later"
            # A slot frees when the running job ends: about one job's time (it was always 1 s, so clients retried
            # every second through a queue that moves once a minute).
            retry = max(1, math.ceil(worker.mean_job_seconds or 1))
            raise RequestError(429, busy, (), {"Retry-After": str(retry)}) from None
        except Stopping:
            raise RequestError(503, STOPPING, ()) from None
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            decoded = await run_in_threadpool(decode)
            if gone.done():
                raise RequestError(CLIENT_GONE, "the client closed the request before it ran", ())
            job = worker.submit(functools.partial(work, decoded), slot)
            result = asyncio.wrap_future(job.future)
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done() and job.cancel():
                raise RequestError(CLIENT_GONE, "the client closed the request before it ran", ())
            if result.cancelled():  # withdrawn by the first Ctrl-C before it ran
                raise RequestError(503, STOPPING, ())
            return await _result(result)
        except Stopping:  # the drain came while its inputs decoded
            raise RequestError(503, STOPPING, ()) from None
        finally:
            slot.release()  # a job that started has released it already
            gone.cancel()

    @app.post("/v1/images", responses=image_responses, dependencies=[Depends(key_header)])
    async def images(body: ImageRequest, request: Request):
        adapters = _select_adapters(body, configured, generator)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)

        def work(decoded):
            settings = GenerationRequest.from_settings(body, body.prompt, images=decoded.images, seed=seed,
                                                       adapters=adapters, mask=decoded.mask,
                                                       mask_feather=body.mask_feather)  # fmt: skip
            with job_warnings() as warned:
                made = _generate(generator, settings, format_for(body.output_format), body.quality, metrics, body,
                                 decoded, serve)  # fmt: skip
            unused = unused_settings(body.model_fields_set, body.output_format == "png", body.mask is not None)
            return *made, decoded.downscaled + warned + [f"{name} {why}" for name, why in unused.items()]

        (width, height), data, made_with, warned = await admitted(
            request, lambda: _decode_inputs(body, serve, gate), work
        )
        headers = {"x-seed": str(seed), **_warning_header(warned)}
        if body.response_format == "b64_json":  # the settings the image carries, also as JSON beside it
            payload = {"data": [{"b64_json": base64.b64encode(data).decode(), "seed": seed, "width": width,
                                 "height": height, "settings": made_with, "warnings": warned}],
                       "output_format": body.output_format}  # fmt: skip
            return JSONResponse(payload, headers=headers)
        # a name for what saves it (a browser, `curl -OJ`): the seed, and the format's extension
        headers["content-disposition"] = f'inline; filename="qwen-image-{seed}.{body.output_format}"'
        return Response(data, media_type=MEDIA_TYPES[format_for(body.output_format)], headers=headers)

    @app.post("/v1/layers", responses={**image_responses, 200: {"description": "the layered file (PSD, OpenRaster or ZIP)"}},
              dependencies=[Depends(key_header)])  # fmt: skip
    async def layers(body: LayersRequest, request: Request):
        adapters = _select_adapters(body, configured, generator)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        elements = [layer_output.Element(e.prompt, (e.x, e.y, e.width, e.height)) for e in body.elements]

        def work(decoded):
            (image,), mask = decoded.images, decoded.mask
            settings = GenerationRequest.from_settings(body, "", images=[image], seed=seed, adapters=adapters,
                                                       mask_feather=body.mask_feather)  # fmt: skip
            try:
                generator.check_limits(settings, serve.max_side, serve.max_steps, "this service's serve")
                start = time.perf_counter()
                with job_warnings() as warned:
                    made = generator.layers(settings, mask if mask is not None else "auto", body.prompt, elements)
                metrics.count_layers(time.perf_counter() - start)
            except InputError as e:  # a mask or element box we refuse, named by its field
                raise RequestError(422, str(e), _loc(e, body, default="image")) from None
            return layer_output.encode_layers(made, body.output_format), decoded.downscaled + warned

        data, warned = await admitted(request, lambda: _decode_inputs(body, serve, gate), work)
        named = {
            "x-seed": str(seed),
            "content-disposition": f'attachment; filename="layers-{seed}.{body.output_format}"',
            **_warning_header(warned),
        }
        return Response(data, media_type=layer_output.MEDIA_TYPES[body.output_format], headers=named)

    app.include_router(studio_router(cfg, key_header, generator))  # the page at / and its read-only endpoints

    @app.get("/healthz")
    async def healthz():
        return {
            "status": "ok",
            "adapters": len(generator.adapters.names),  # open, so no names: often a client's or a brand's
            "queue": worker.waiting,
            "max_queue": serve.max_queue,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


async def _disconnected(receive) -> None:
    """Returns when the client goes away (the body has been read, so `receive` has nothing else to give)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _ThreadWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread, self.messages = threading.get_ident(), []

    def emit(self, record: logging.LogRecord) -> None:
        # once each: a layers job renders three times or more, and each render said the same thing
        if record.thread == self.thread and (message := record.getMessage()) not in self.messages:
            self.messages.append(message)


class _UniqueKeysRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            try:
                self._json = json.loads(await self.body(), object_pairs_hook=unique_keys)
            except DuplicateKey as e:  # FastAPI re-raises an HTTPException as it is (anything else is its 400)
                raise HTTPException(422, str(e)) from None
        return self._json


class _UniqueKeysRoute(APIRoute):
    """A body whose JSON names a key twice is a 422: JSON keeps the last, so `{"loras": {"brand": 1, "brand": 2}}`
    rendered at 2, and a second "prompt" replaced the first, where a batch line with either is refused."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(_UniqueKeysRequest(request.scope, request.receive))

        return route


@contextlib.contextmanager
def job_warnings():
    """The warnings our code logs on this thread while a job runs ("mask: white everywhere, so this is a plain edit"):
    they reached the service's console alone, naming no request, and the client got a 200 and no hint."""
    handler = _ThreadWarnings()
    package = logging.getLogger("qwen_image_lora")
    package.addHandler(handler)
    try:
        yield handler.messages
    finally:
        package.removeHandler(handler)


def _warning_header(warned: list[str]) -> dict[str, str]:
    """`x-warning`: the job's warnings as one header line: latin-1 text without control characters (a line break a
    message might carry from a request would end the header, and h11 refuses it: a 500)."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", "; ".join(warned)).encode("latin-1", "replace").decode("latin-1")
    return {"x-warning": text} if warned else {}


async def _result(result: asyncio.Future):
    try:
        return await result
    except RequestError:
        raise
    except Exception:
        log.exception("generation failed")
        raise


def _loc(error: InputError, body, default: str | None = None) -> tuple:
    """The 422 `loc` of an error the generator raised: the request field it names (the generator's `images` arrive as
    the request's `image`), with the item's index where that field was given as a list."""
    field = {"images": "image"}.get(error.field, error.field) or default
    if field not in type(body).model_fields:
        return ("body",)
    listed = error.index is not None and isinstance(getattr(body, field), list)
    return ("body", field, error.index) if listed else ("body", field)


def _generate(generator: Generator, request: GenerationRequest, fmt: str, quality: int, metrics: Metrics, body,
              decoded: "Decoded", serve: ServeConfig):  # fmt: skip
    """The job, on the worker thread: (size, encoded bytes, the settings block written into them; its inputs named by
    sha256 alone). It empties `request.images` when it ends, so the decoded inputs are freed then, whoever still holds
    the request."""
    try:
        try:  # `generate` checks the request first (the tokenizer is used on the worker thread only)
            generator.check_limits(request, serve.max_side, serve.max_steps, "this service's serve")
            start = time.perf_counter()
            image = generator.generate(request)
            metrics.count_image(time.perf_counter() - start)
            made_with = generator.describe(request, decoded.inputs, decoded.mask_input)
            data = encode_image(image, fmt, quality, made_with)  # a JPEG's EXIF cannot hold very long settings
        except InputError as e:
            raise RequestError(422, str(e), _loc(e, body)) from None
        return image.size, data, settings_as_written(made_with, fmt, quality)
    finally:
        request.images.clear()


class Decoded(NamedTuple):
    images: list  # PIL images
    mask: object  # a PIL image or None
    inputs: list[InputRecord]  # the images' sha256, for the settings block
    mask_input: InputRecord | None
    downscaled: list[str]  # said to the client (x-warning): the result is smaller than what it sent


def _decode_inputs(body, serve: ServeConfig, gate: DecodeGate) -> Decoded:
    """Each `image` entry and the `mask` (URL, base64 or data: URL; `auto` stays None) -> PIL images that fit
    `serve.max_side`, with their bytes' sha256; errors name `image[i]` or `mask`. Runs after admission; decodes pass
    through `gate`."""
    items = [] if body.image is None else [body.image] if isinstance(body.image, str) else list(body.image)
    deadline = time.monotonic() + serve.url_timeout_s  # one budget for all of the request's URLs
    images = [_decode_one(item, ("body", "image") if isinstance(body.image, str) else ("body", "image", i), serve, gate,
                          deadline) for i, item in enumerate(items)]  # fmt: skip
    mask = body.mask if body.mask not in (None, "auto") else None
    mask, mask_input, _, mask_size = (
        (None, None, None, None) if mask is None else _decode_one(mask, ("body", "mask"), serve, gate, deadline, False)
    )
    if mask is not None and images:  # on the sizes sent: the downscaled ones were named in the 422, never sent
        try:
            mask_rules.check_aspect(mask_size, images[-1][3])
        except mask_rules.MaskError as e:
            raise RequestError(422, str(e), ("body", "mask")) from None
    downscaled = [f"image{'' if isinstance(body.image, str) else f'[{i}]'}: {said}"
                  for i, (_, _, said, _) in enumerate(images) if said]  # fmt: skip
    return Decoded([im for im, *_ in images], mask, [record for _, record, *_ in images], mask_input, downscaled)


def _decode_one(
    item: str, loc: tuple, serve: ServeConfig, gate: DecodeGate, deadline: float, colours: bool = True
) -> tuple:
    """One image (URL, base64 or data: URL) -> (PIL image, the sha256 of its bytes, a note when it was downscaled to
    fit `serve.max_side`, its size as sent), or a RequestError naming `loc`. `colours=False` for a mask: its numbers
    are coverage, no colour profile applies."""
    try:
        if item.startswith(("http://", "https://")) or "://" in item[:16]:
            data = fetch(item, allow_private=serve.allow_private_urls, timeout_s=serve.url_timeout_s,
                         max_bytes=int(serve.max_url_mb * 2**20), deadline=deadline)  # fmt: skip
        else:
            payload = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
            try:  # line breaks carry nothing (`base64` wraps at 76 columns by default): dropped, as are spaces
                data = base64.b64decode(payload.encode("ascii").translate(None, b" \t\n\r\f\v"), validate=True)
            except (binascii.Error, ValueError) as e:
                raise ImageInputError(f"not an http(s) URL and not valid base64 ({e}); send standard base64 ('+' and "
                                      "'/', not URL-safe '-' and '_') with its '=' padding, as `base64 -w0 FILE` "
                                      "writes it") from e  # fmt: skip
        max_side = min(MAX_INPUT_SIDE, serve.max_side)
        with gate(decode_cost(data, max_side)):  # from the header: what this decode will hold, against the budget
            image = decode_image(data, max_side=max_side, colours=colours)
        (w, h), said = identify(data).size if max(image.size) == max_side else image.size, None
        if max(w, h) > max_side:  # the CLI reads files up to 4096 px: the same edit came back smaller here, unsaid
            said = (f"{w}x{h} was read at {image.width}x{image.height} (this service reads inputs up to {max_side} px "
                    f"on the long side: serve.max_side, at most {MAX_INPUT_SIDE}), so the result is that size")  # fmt: skip
        return image, bytes_record(data), said, (w, h)
    except (URLRefused, ImageInputError) as e:
        raise RequestError(413 if e.too_large else 422, str(e), loc) from e


def _select_adapters(body, configured: dict[str, float], generator: Generator) -> dict[str, float]:
    if body.loras is None:
        return dict(configured)
    if twice := repeated_name(ref.name for ref in body.loras):
        i, name = twice
        raise RequestError(422, f"adapter {name!r} is given twice; give each once", ("body", "loras", i, "name"))
    known = generator.adapters.names
    chosen = {}
    for i, ref in enumerate(body.loras):
        if ref.name not in known:
            raise RequestError(422, f"unknown adapter {ref.name!r}; known adapters: {', '.join(known) or 'none'}",
                               ("body", "loras", i, "name"))  # fmt: skip
        chosen[ref.name] = ref.weight if ref.weight is not None else configured.get(ref.name, 1.0)
    return chosen
