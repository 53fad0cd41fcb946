"""The `serve:` section of the config: the HTTP service's address, adapters, request limits and keys.

Part of the schema in `config.py` (`Config.serve`, loaded and checked with the rest of the file); apart because only
`qwen-lora serve` (`inference/server.py`, the studio) reads it.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from pathlib import Path

from qwen_image_lora.errors import InputError, NotFound
from qwen_image_lora.knobs import (
    MAX_GUIDANCE_SCALE,
    MAX_STEPS,
    SettingError,
    check_adapter_name,
    check_adapter_weight,
    repeated_name,
)
from qwen_image_lora.presets import MAX_SIDE, SIDE_MULTIPLE
from qwen_image_lora.typed_yaml import ConfigError, path_field, require

# The sampling fields whose upper bound is this deployment's (`serve.<setting>`), not the model's.
REQUEST_LIMITS = {"num_inference_steps": "max_steps", "guidance_scale": "max_guidance_scale", "width": "max_side",
                  "height": "max_side"}  # fmt: skip


@dataclass
class ServeAdapter:
    name: str = ""
    path: str = path_field("", hub_id=True)
    weight: float = 1.0

    def validate(self, where: str) -> None:
        try:
            if self.name:  # empty: the name comes from the path
                check_adapter_name(f"{where}.name", self.name)
            check_adapter_weight(f"{where}.weight", self.weight)
        except SettingError as e:
            raise ConfigError(str(e)) from None


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    adapters: list[ServeAdapter] = field(default_factory=list)
    api_keys_env: str = "QWEN_LORA_API_KEYS"
    api_keys_file: str | None = path_field()
    max_body_mb: float = 20.0
    max_queue: int = 8
    allow_private_urls: bool = False
    url_timeout_s: float = 10.0
    max_url_mb: float = 20.0
    # Request limits, enforced with a 422 naming the field and the setting (and shown in /openapi.json).
    max_steps: int = 100
    max_guidance_scale: float = 20.0
    max_side: int = 2048
    # Training run folders (one per run: losses.jsonl, samples/, README.md, eval/) the studio page shows, read-only.
    runs_dir: str | None = path_field()
    # Swagger UI at /docs. Off: its script and stylesheet come from cdn.jsdelivr.net (no installed package ships
    # them) and the service is otherwise offline. On: the studio's CSP plus that CDN and the page's one inline script.
    api_docs: bool = False

    def validate(self, where: str) -> None:
        require(where, self, lambda v: 0 <= v <= 65535, "in 0..65535", "port")
        require(where, self, lambda v: v >= 1, ">= 1 (0 refuses every request)", "max_queue")
        require(where, self, lambda v: 1 <= v <= MAX_STEPS, f"in 1..{MAX_STEPS} (every edge's limit)", "max_steps")
        require(
            where, self, lambda v: 0 < v <= MAX_GUIDANCE_SCALE, f"> 0 and <= {MAX_GUIDANCE_SCALE:g} (every edge's limit)",
            "max_guidance_scale",
        )  # fmt: skip
        require(where, self, lambda v: SIDE_MULTIPLE <= v <= MAX_SIDE, f"in {SIDE_MULTIPLE}..{MAX_SIDE}", "max_side")
        if twice := repeated_name(a.name for a in self.adapters if a.name):
            raise ConfigError(f"{where}.adapters: the name {twice[1]!r} is given twice; each adapter needs its own")
        require(where, self, lambda v: v > 0, "> 0", "max_body_mb", "url_timeout_s", "max_url_mb")


def load_api_keys(serve: ServeConfig, environ) -> list[str]:
    """Keys from the env var named by `serve.api_keys_env` (comma-separated) and/or `serve.api_keys_file` (one
    per line, # comments). The CLI calls this; the app itself never reads the environment."""
    keys = [k.strip() for k in environ.get(serve.api_keys_env, "").split(",") if k.strip()]
    if serve.api_keys_file:
        if not Path(serve.api_keys_file).is_file():
            raise NotFound(
                f"serve.api_keys_file: {serve.api_keys_file} does not exist (one key per line)", "serve.api_keys_file"
            )
        for line in Path(serve.api_keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    if not keys:
        raise InputError(
            f"serve: no API keys; set {serve.api_keys_env}=key1,key2 or serve.api_keys_file (requests need x-api-key)",
            "serve.api_keys_env",
        )
    return keys


def listen(host: str, port: int) -> socket.socket:
    """The service's listening socket, claimed before the model loads: a port in use was uvicorn's raw
    `[Errno 98] ... address already in use` after "serving ... at" had been said and the weights had loaded."""
    where = f"{host}:{port}"
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)  # SO_REUSEADDR, as uvicorn binds
    except socket.gaierror:
        raise InputError(f"serve.host: {host} is not a name or address of this machine; give one with --host "
                         "(127.0.0.1 serves this machine only, 0.0.0.0 every network)", "serve.host") from None  # fmt: skip
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why = "is in use by another program (another qwen-lora serve?)"
        elif e.errno == errno.EACCES:
            why = "needs privileges this user does not have (ports under 1024 are reserved)"
        elif e.errno == errno.EADDRNOTAVAIL:
            raise InputError(f"serve.host: {host} is not an address of this machine; give one with --host",
                             "serve.host") from None  # fmt: skip
        else:
            why = f"cannot be listened on ({e.strerror})"
        raise InputError(f"serve.port: {where} {why}; pick another port with --port N (or serve.port=N)",
                         "serve.port") from None  # fmt: skip
