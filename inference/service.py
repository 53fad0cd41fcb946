"""`qwen-lora serve` as a process: the app (`server.create_app`) under uvicorn, one console line saying what is served
where, and what Ctrl-C does. The first Ctrl-C (or SIGTERM) finishes the image in progress, answers every queued request
503 at once and says so; a second stops at once. uvicorn alone ran every queued job first, silently (a minute for
four), and on a second Ctrl-C printed a traceback per request and aborted with a torch thread still running."""

from __future__ import annotations

import os
import sys

import uvicorn

from qwen_image_lora.config import Config
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.server import create_app


def serve(cfg: Config, api_keys: list[str]) -> int:
    """Run the service until Ctrl-C; the exit status (130 after Ctrl-C, as a shell gives an interrupted command)."""
    try:
        make_server(cfg, api_keys).run()
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
    return _Server(uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning"))


class _Server(uvicorn.Server):
    """uvicorn's server with our two steps of Ctrl-C (the module's docstring)."""

    def handle_exit(self, sig: int, frame) -> None:
        worker = self.config.app.state.worker
        if self.should_exit:
            print("stopped: the image in progress was dropped (the service writes no files)", file=sys.stderr,
                  flush=True)  # fmt: skip
            os._exit(128 + sig)
        running, withdrawn = worker.busy, worker.drain()
        said = ["finishing the image in progress (Ctrl-C again drops it)"] if running else []
        said += [f"{withdrawn} queued requests answered 503"] if withdrawn else []
        print("stopping" + (": " + "; ".join(said) if said else ""), file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)
