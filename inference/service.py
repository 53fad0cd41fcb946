"""`qwen-lora serve` as a process: the app (`server.create_app`) under uvicorn, one console line saying what is served
where, and what Ctrl-C does. The first Ctrl-C (or SIGTERM) finishes the image in progress, answers every queued request
503 at once and says so; a second stops at once. uvicorn alone ran every queued job first, silently (a minute for
four), and on a second Ctrl-C printed a traceback per request and aborted with a torch thread still running."""

from __future__ import annotations

import os
import socket
import sys

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen_image_lora.config import Config
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.server import create_app


def serve(cfg: Config, api_keys: list[str], sock: socket.socket) -> int:
    """Run the service on `sock` (`serve_config.listen`) until Ctrl-C; the exit status (130 after Ctrl-C, as a shell
    gives an interrupted command)."""
    try:
        make_server(cfg, api_keys).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has stopped; `handle_exit` has said so
        return 130
    return 0


def make_server(cfg: Config, api_keys: list[str], generator: Generator | None = None) -> uvicorn.Server:
    """The service under uvicorn, ready to run. The console gets one line of ours saying what is served where;
    uvicorn says only its warnings and errors (not its start-up lines or a line per request: /metrics counts them)."""
    app = create_app(cfg, api_keys, generator)
    adapters = ", ".join(app.state.generator.adapters.names) or "none"
    print(f"serving {cfg.model.pretrained} (adapters: {adapters}) at http://{cfg.serve.host}:{cfg.serve.port}/: the "
          "studio page at /, the API under /v1, metrics at /metrics; Ctrl-C stops", file=sys.stderr, flush=True)  # fmt: skip
    config = uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning", http=_GuardedH11)
    return _Server(config)


HEADER_TIMEOUT_S = 10  # from a connection (or its previous response) to the end of a request's headers
MAX_CONNECTIONS = 512  # open at once; the worker renders one image at a time behind a queue of serve.max_queue


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the two limits it lacks. A client that opens connections and sends their
    headers a byte at a time (or never ends them) held each one open for good: 20,000 of them in 16 s ran the
    process out of file descriptors, every other client timed out, and asyncio logged a traceback per refused
    accept (122 MB of log in 15 s). Headers now have HEADER_TIMEOUT_S to arrive, and a connection over
    MAX_CONNECTIONS is closed as it opens. (A reverse proxy in front is still the place for per-client limits.)"""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline, self._before = None, None
        if len(self.connections) > MAX_CONNECTIONS:
            transport.close()
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._before:  # a request's headers are complete: it is the app's from here
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        self._await_headers()  # the next request on this connection gets its own HEADER_TIMEOUT_S
        super().on_response_complete()
        if self.cycle is not self._before:  # a pipelined request was already waiting
            self._cancel_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._cancel_deadline()
        self._before = self.cycle
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.cycle is self._before and not self.transport.is_closing():
            self.transport.close()

    def _cancel_deadline(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None


class _Server(uvicorn.Server):
    """uvicorn's server with our two steps of Ctrl-C (the module's docstring)."""

    def handle_exit(self, sig: int, frame) -> None:
        worker = self.config.app.state.worker
        if self.should_exit:
            print("stopped: the image in progress was dropped (the service writes no files)", file=sys.stderr,
                  flush=True)  # fmt: skip
            os._exit(128 + sig)
        print(stopping_line(worker.busy, worker.drain()), file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)


def stopping_line(running: bool, withdrawn: int) -> str:
    """The first Ctrl-C's one line: the image that finishes, and how many waiting requests were answered 503."""
    said = ["finishing the image in progress (Ctrl-C again drops it)"] if running else []
    said += [f"{withdrawn} waiting request{'s' if withdrawn > 1 else ''} answered 503"] if withdrawn else []
    return "stopping" + (": " + "; ".join(said) if said else "")
