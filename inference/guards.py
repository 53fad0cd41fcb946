"""Request guards that run before any work is spent on a request: the API key (checked from the headers, before
the body is read), the body size, a bound on concurrent image decodes, refusals that never echo their input back,
and a count of every response (Starlette's own 500s included) for /metrics."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import hashlib
import hmac
import json
import threading

from qwen_image_lora.images import DecodeCost, ImageInputError
from qwen_image_lora.inference.metrics import Metrics
from qwen_image_lora.inference.studio import STATIC_PATHS
from qwen_image_lora.inference.worker import release_memory
from qwen_image_lora.knobs import SamplingConfig, SettingError
from qwen_image_lora.serve_config import REQUEST_LIMITS

# Paths served without a key; every other path (the API, and unknown paths) needs one.
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json", "/docs"}) | STATIC_PATHS  # /docs: when serve.api_docs
COUNTED_PATHS = ("/v1/images", "/v1/layers", "/healthz", "/metrics", "/openapi.json")
JSON_PATHS = frozenset({"/v1/images", "/v1/layers"})  # their POST bodies are JSON
MAX_MESSAGE_CHARS = 500  # a refusal names the problem; it never sends megabytes of the request back
MAX_LOC_CHARS = 64  # a field name is short; a longer one is the client's text
MAX_ERRORS = 20
# A body's bytes must keep coming: 512 connections that declared a body and sent none held every slot for good (the
# header deadline had passed), closing the service to every client. A pause of BODY_IDLE_S, or a body still arriving
# after BODY_TOTAL_S (a trickle; 20 MB at ~3 Mbit/s fits), is answered 408 and the connection closed.
BODY_IDLE_S, BODY_TOTAL_S = 10.0, 60.0
# What concurrent input decodes may hold at once. Every JPEG/PNG up to 64 M pixels fits (an 8192x8192 RGBA PNG takes
# ~350 MB); a WebP takes ~16 bytes a pixel in PIL's decoder, so one over ~28 M pixels (~5300x5300) is refused.
DECODE_BUDGET_BYTES = 512 * 2**20
# glibc raises its mmap threshold after each large free (up to 32 MB); PIL's 16 MB image blocks then come from the
# heaps of the threads that decode, which keep them once freed, and a burst of decodes held ~250 MB more than was live
# (scripts/soak_server.py). A fixed threshold keeps every buffer from 4 MB up mmapped: freed, it is returned at once.
_MALLOPT, _M_MMAP_THRESHOLD, _MMAP_FROM = getattr(ctypes.CDLL(None), "mallopt", None), -3, 4 * 2**20


class RequestError(Exception):
    """An answer other than 200, with the field it is about (FastAPI's 422 shape: detail[].loc/msg)."""

    def __init__(self, status: int, msg: str, loc: tuple = ("body",), headers: dict | None = None):
        super().__init__(msg)
        self.status, self.msg, self.loc, self.headers = status, msg, loc, headers

    def body(self) -> dict:
        return {"detail": [{"loc": list(self.loc), "msg": clip(self.msg), "type": "value_error"}]}


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


# A batch line's names for what a request body calls otherwise (`qwen-lora batch` says the way back: "did you mean").
BATCH_NAMES = {"images": "image", "output": "output_format"}


def validation_error_body(errors: list[dict]) -> dict:
    """FastAPI's 422 shape without `input`/`ctx`: those echo the request (megabytes of base64) and may hold NaN or
    inf, which no JSON encoder may write (FastAPI's default handler then fails with a 500). A `loc` names what the
    client sent, so it is clipped too, and at most MAX_ERRORS are listed: a 4 MB body of unknown keys was answered
    with every key (a 32 MB 422), a 4 MB key echoed whole."""
    detail = []
    for e in errors[:MAX_ERRORS]:
        loc, msg = _located(e)
        detail.append({"loc": [clip(part, MAX_LOC_CHARS) if isinstance(part, str) else part for part in loc],
                       "msg": clip(str(msg)), "type": e["type"]})  # fmt: skip
    if len(errors) > MAX_ERRORS:
        more = f"{len(errors) - MAX_ERRORS:,} more errors not listed; fix these first"
        detail.append({"loc": ["body"], "msg": more, "type": "too_many_errors"})
    return {"detail": detail}


def _located(error: dict) -> tuple[list, str]:
    """(loc, msg) of one error; a sampling rule's refusal (a SettingError raised by a model validator) at the field it
    names, in its own words: pydantic can only put it at `body`, prefixed "Value error, "."""
    refusal = (error.get("ctx") or {}).get("error")
    if isinstance(refusal, SettingError):
        return [*error["loc"], refusal.field] if refusal.field else list(error["loc"]), refusal.message
    field = error["loc"][-1] if error["loc"] else None
    if error["type"] == "less_than_equal" and field in REQUEST_LIMITS:  # "<= 100" said nothing of where 100 comes from
        return list(error["loc"]), f"{error['msg']} (this service's serve.{REQUEST_LIMITS[field]})"
    if error["type"] == "extra_forbidden" and field in BATCH_NAMES:  # a batch line sent as a request
        return list(error["loc"]), f"{error['msg']}; a batch line's {field!r} is {BATCH_NAMES[field]!r} here"
    if error["type"] == "extra_forbidden" and field in SamplingConfig.SHORT_NAMES:  # the CLI's --steps
        return list(error["loc"]), f"{error['msg']}; did you mean {SamplingConfig.SHORT_NAMES[field]!r}?"
    if error["type"] == "value_error":  # a validator's own sentence, without pydantic's "Value error, " before it
        return list(error["loc"]), error["msg"].removeprefix("Value error, ")
    return list(error["loc"]), error["msg"]


class KeyCheck:
    """Constant-time comparison: digests of equal length, every key compared, no early exit. The presented key must
    equal a key exactly (no trimming, no case folding; a prefix or an extension is a different key)."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __call__(self, presented: str | bytes | None) -> bool:
        raw = presented.encode() if isinstance(presented, str) else presented or b""
        digest = hashlib.sha256(raw).digest()
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        return ok and bool(raw)


class DecodeGate:
    """Input images decode at most `limit` at once, and only while the decodes' costs (`images.decode_cost`: the
    decoded frame, what the decoder holds beside it, the conversion temporaries) sum to at most `budget` bytes, in
    arrival order; one that could never fit is refused (413) naming the budget. So decodes hold at most `budget`
    whatever the format, however many requests are admitted. Large buffers are mmapped, and when the last running
    decode ends the rest of the freed heap goes back to the OS, so memory freed is memory returned."""

    def __init__(self, limit: int, budget: int = DECODE_BUDGET_BYTES):
        self.limit, self.budget = limit, budget
        if _MALLOPT is not None:  # absent outside glibc
            _MALLOPT(_M_MMAP_THRESHOLD, _MMAP_FROM)
        self._changed = threading.Condition()
        self._turns: collections.deque = collections.deque()  # waiting decodes, first come first in
        self.active = self.held = 0

    @property
    def waiting(self) -> int:
        return len(self._turns)

    @contextlib.contextmanager
    def __call__(self, cost: DecodeCost | None = None):
        need = 0 if cost is None else cost.bytes
        if need > self.budget:
            raise ImageInputError(f"decoding this {cost.what} image takes about {need / 2**20:,.0f} MB, over the service's "
                                  f"decode budget of {self.budget / 2**20:,.0f} MB; send a smaller image, or a JPEG "
                                  "or PNG", too_large=True)  # fmt: skip
        turn = object()
        with self._changed:
            self._turns.append(turn)
            self._changed.wait_for(
                lambda: self._turns[0] is turn and self.active < self.limit and self.held + need <= self.budget
            )
            self._turns.popleft()
            self.active, self.held = self.active + 1, self.held + need
            self._changed.notify_all()  # the next in line may fit beside this one
        try:
            yield
        finally:
            with self._changed:
                self.active, self.held = self.active - 1, self.held - need
                idle = self.active == 0
                self._changed.notify_all()
            if idle:
                release_memory()


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The API keys a request presents: each `x-api-key`, and an `Authorization: Bearer` token (what OpenAI-style
    clients send). More than one is refused, even if equal: one credential per request."""
    bearer = [v.split(None, 1) for k, v in headers if k == b"authorization"]
    return [v for k, v in headers if k == b"x-api-key"] + [
        parts[1] for parts in bearer if len(parts) == 2 and parts[0].lower() == b"bearer"
    ]


async def send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """Pure ASGI, outside FastAPI: refuses a missing or wrong `x-api-key` (401) from the headers alone, then a body
    over the limit (413; Content-Length first, chunked bodies counted as they arrive) before FastAPI parses anything,
    and counts every response by path and status, including the 500 Starlette sends for an unhandled error."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics, check_key: KeyCheck):
        self.app, self.max_body_bytes, self.metrics, self.check_key = app, max_body_bytes, metrics, check_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in COUNTED_PATHS else "other"
        started, head = False, scope["method"] == "HEAD"
        if head:  # its GET's answer without the body: FastAPI's GET routes answered HEAD (a load balancer's) 405
            scope = {**scope, "method": "GET"}

        async def counted_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count_response(path, message["status"])
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            replay = await self._admit(scope, receive, counted_send)
            if replay is not None:
                await self.app(scope, replay, counted_send)
        except Exception:
            if not started:  # Starlette's ServerErrorMiddleware (outside us) answers 500 for it
                self.metrics.count_response(path, 500)
            raise

    async def _admit(self, scope, receive, send):
        """None when the request was answered (or the client left); else a `receive` that replays the body."""
        headers = scope["headers"]
        if scope["path"] not in OPEN_PATHS:
            keys = presented_keys(headers)
            if len(keys) != 1 or not self.check_key(keys[0]):
                said = (
                    "send one credential: x-api-key or Authorization: Bearer, not both (nor one twice)"
                    if len(keys) > 1
                    else "missing or wrong x-api-key (or Authorization: Bearer)"
                )
                await send_json(send, 401, RequestError(401, said, ("header", "x-api-key")).body(),
                                {"WWW-Authenticate": "ApiKey"})  # fmt: skip
                return None
        if scope["method"] == "POST" and scope["path"] in JSON_PATHS:
            kind = dict(headers).get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":  # was 422 "Input should be a valid dictionary", which hid the cause
                said = f"send the body as JSON with Content-Type: application/json (got {kind.decode('latin-1') or 'none'})"
                await send_json(send, 415, RequestError(415, said, ("header", "content-type")).body())
                return None
        limit = self.max_body_bytes
        too_big = {
            "detail": [
                {"loc": ["body"], "msg": f"request body over {limit:,} bytes (serve.max_body_mb)", "type": "too_large"}
            ]
        }
        declared = dict(headers).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            status = 413 if declared.isdigit() else 400
            bad = RequestError(400, "Content-Length is not a whole number of bytes", ("header", "content-length"))
            await send_json(send, status, too_big if status == 413 else bad.body())
            return None
        chunks, size, more = [], 0, True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TOTAL_S
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(BODY_IDLE_S, deadline - loop.time())))
            except TimeoutError:
                said = f"the body stopped arriving (a pause over {BODY_IDLE_S:g} s, or over {BODY_TOTAL_S:g} s in all)"
                await send_json(send, 408, RequestError(408, said).body(), {"Connection": "close"})
                return None
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await send_json(send, 413, too_big)
                return None
        chunks.reverse()

        async def replay():  # the chunks as they came (no joined copy), then the client's own messages
            if chunks:
                return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}
            return await receive()

        return replay
