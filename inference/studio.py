"""The studio: a web page at `/` (static files shipped in `inference/studio_assets/`, served under /studio/) that
is only a client of the HTTP API, plus the read-only endpoints it needs beside `POST /v1/images`:

    GET /v1/adapters                     the service's adapters and their configured weights
    GET /v1/runs                         the training run folders under `serve.runs_dir`
    GET /v1/runs/{name}                  one run: loss curve, validation samples by step, model card, eval report
    GET /v1/runs/{name}/files/{path}     a file of that run (images, JSON, Markdown, the report), nothing outside it

The static files need no key (they are the page; it runs nothing by itself); every `/v1/` endpoint needs one.
The page gets a restrictive Content-Security-Policy: scripts and styles from this origin only, nothing inline.
With `serve.api_docs`, `/docs` serves Swagger UI under the same policy, widened only by its CDN and its one inline
script (by hash).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from pathlib import Path, PurePosixPath

import yaml
from fastapi import APIRouter, Depends
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response

from qwen_image_lora import run_layout as layout
from qwen_image_lora.config import Config

STUDIO_DIR = Path(__file__).with_name("studio_assets")  # served under /studio/
ASSET_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".svg": "image/svg+xml"}  # fmt: skip
ASSETS = {p.name: p for p in sorted(STUDIO_DIR.iterdir()) if p.suffix in ASSET_TYPES}
# Served without a key (the auth guard's list of open paths takes these).
STATIC_PATHS = frozenset({"/"} | {f"/studio/{name}" for name in ASSETS})

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}  # fmt: skip
DOCS_CDN = "https://cdn.jsdelivr.net"  # where FastAPI's Swagger UI page takes its script and stylesheet from

# What a run folder holds: the names the trainer and the evaluator write (run_layout.py).
LOSSES, CARD, METADATA, SAMPLES, REPORT_DIR = layout.LOSSES, layout.CARD, layout.METADATA, layout.SAMPLES, layout.EVAL
RUN_FILES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
             ".json": "application/json", ".jsonl": "application/x-ndjson", ".md": "text/markdown; charset=utf-8",
             ".yaml": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8", ".html": "text/html; charset=utf-8"}  # fmt: skip
MAX_LOSS_POINTS = 2000  # a long run's curve is thinned to this many points (the last step always kept)
MAX_CARD_CHARS = 200_000
MAX_SMALL_FILE_BYTES = 1 << 20  # a run's JSON and YAML files (metadata, progress, config) are a few KB
MAX_LOSS_LOG_BYTES = 256 << 20  # ~2.5M steps of the per-step log
# An absolute POSIX path in a model card: starts a word (not the second half of a/b, a URL's //host/path, or </tag>).
_ABS_PATH = re.compile(r"(?<![\w.~:/<-])/[^\s`'\"()<>\[\]{}|,;*]+")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# What reading a damaged file or line raises: bad text or JSON, a missing key, a value of the wrong type, a number
# past int's or float's range (`1e400` reads as inf, which int() refuses), nesting deeper than the parser recurses.
_DAMAGED = (ValueError, KeyError, TypeError, OverflowError, RecursionError)


class RunFileError(Exception):
    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status


def studio_router(cfg: Config, key_dependency, generator):
    """The page's routes; `key_dependency` is the app's x-api-key dependency (a refused key never reaches them)."""

    router = APIRouter()
    runs_dir = Path(cfg.serve.runs_dir) if cfg.serve.runs_dir else None
    weights = {a.name: a.weight for a in cfg.serve.adapters}
    sources = {a.name: a.path for a in cfg.serve.adapters}

    def asset(name: str) -> Response:
        path = ASSETS[name]
        return Response(path.read_bytes(), media_type=ASSET_TYPES[path.suffix], headers=PAGE_HEADERS)

    @router.get("/", include_in_schema=False)
    async def index():
        return asset("index.html")

    @router.get("/studio/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in ASSETS:
            return JSONResponse({"detail": f"no studio file {name!r}"}, status_code=404)
        return asset(name)

    if cfg.serve.api_docs:
        docs = docs_page()

        @router.get("/docs", include_in_schema=False)
        async def api_docs():
            return docs

    def refused(e: RunFileError):
        return JSONResponse({"detail": [{"loc": ["path"], "msg": str(e), "type": "value_error"}]}, status_code=e.status)

    @router.get("/v1/adapters", dependencies=[Depends(key_dependency)], summary="The service's adapters")
    async def adapters():
        """Each loaded adapter, its default weight (used when a request omits `loras`) and, when its file lies in a
        run folder under `serve.runs_dir`, that run's name; and the variable the service's keys come from (the
        page's "Copy as curl" reads the key from it)."""
        out = []
        for name in generator.adapters.names:
            out.append({"name": name, "weight": weights.get(name, generator.adapters.loaded[name].weight),
                        "run": run_of(runs_dir, sources.get(name))})  # fmt: skip
        return {"adapters": out, "api_keys_env": cfg.serve.api_keys_env}

    @router.get("/v1/runs", dependencies=[Depends(key_dependency)], summary="Training runs under serve.runs_dir")
    def runs():  # plain `def` handlers: FastAPI runs them on its thread pool, off the event loop (disk reads)
        return {"configured": runs_dir is not None, "runs": list_runs(runs_dir) if runs_dir else []}

    @router.get(
        "/v1/runs/{name}", dependencies=[Depends(key_dependency)], summary="One run's curve, samples, card, report"
    )
    def run(name: str):
        try:
            return describe_run(run_folder(runs_dir, name))
        except RunFileError as e:
            return refused(e)

    @router.get(
        "/v1/runs/{name}/files/{path:path}", dependencies=[Depends(key_dependency)], summary="A file of one run"
    )
    def run_file(name: str, path: str):
        try:
            file = file_in_run(run_folder(runs_dir, name), path)
        except RunFileError as e:
            return refused(e)
        headers, download = dict(PAGE_HEADERS), None
        if file.suffix == ".html":  # the evaluation report: a download, never a page of this origin
            headers["Content-Security-Policy"] = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"
            download = f"{name}-{file.name}"  # Starlette writes any name (RFC 5987); by hand, 报告.html was a 500
        return FileResponse(file, media_type=RUN_FILES[file.suffix.lower()], headers=headers, filename=download)

    return router


def docs_page():
    """FastAPI's Swagger UI page for /openapi.json under the studio's CSP plus the CDN and the page's inline script."""

    page = get_swagger_ui_html(openapi_url="/openapi.json", title="qwen-image-lora API", swagger_favicon_url="data:,")
    inline = re.findall(r"<script>(.*?)</script>", page.body.decode(), re.DOTALL)
    hashes = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline)
    csp = CSP.replace("script-src 'self'", f"script-src 'self' {DOCS_CDN}{hashes}", 1)
    csp = csp.replace("style-src 'self'", f"style-src 'self' {DOCS_CDN}", 1)
    return Response(
        page.body, media_type="text/html; charset=utf-8", headers={**PAGE_HEADERS, "Content-Security-Policy": csp}
    )


# --------------------------------------------------------------------------------------------- run folders


def run_folder(runs_dir: Path | None, name: str) -> Path:
    """`runs_dir/name`, for a plain folder name only (no separators, no `..`, no hidden names)."""
    if runs_dir is None:
        raise RunFileError(404, "no run folders: the service has no serve.runs_dir")
    if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise RunFileError(400, f"{name!r} is not a run folder name (letters, digits, '.', '_', '-')")
    folder = runs_dir / name
    if not folder.is_dir() or not _inside(folder, runs_dir):
        raise RunFileError(404, f"no run {name!r} under serve.runs_dir")
    return folder


def file_in_run(folder: Path, rel: str) -> Path:
    """A file inside `folder` (after resolving links) with a known suffix; anything else is refused."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or "\x00" in rel or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise RunFileError(400, f"{rel!r}: give a path inside the run folder (no '..', no absolute or hidden paths, "
                           "no NUL)")  # fmt: skip
    path = folder.joinpath(*parts)
    try:
        if not _inside(path, folder):
            raise RunFileError(400, f"{rel!r} leads outside the run folder")
        if path.suffix.lower() not in RUN_FILES:
            raise RunFileError(403, f"{rel!r}: only {', '.join(sorted(RUN_FILES))} files of a run are served")
        if not path.is_file():
            raise RunFileError(404, f"no file {rel!r} in this run")
    except OSError:  # e.g. a name longer than the file system allows: no such file
        raise RunFileError(404, f"no file {rel!r} in this run") from None
    return path


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _readable(path: Path, root: Path) -> bool:
    """A regular file inside `root` once links are resolved: what the page may open and read (not a FIFO, not a link
    out of the run)."""
    return path.is_file() and _inside(path, root)


def _run_text(path: Path, root: Path | None = None, limit: int = MAX_SMALL_FILE_BYTES) -> str | None:
    """A run file's text, None unless it is `_readable` inside `root` (its folder by default) and at most `limit`
    bytes: a link out of the run read the file it points at, and a FIFO blocked the thread (and with it the service's
    decodes) forever."""
    try:
        if not _readable(path, root or path.parent):
            return None
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    return None if len(data) > limit else data.decode("utf-8", errors="replace")


def run_of(runs_dir: Path | None, adapter_path: str | None) -> str | None:
    """The run folder (a direct child of `runs_dir`) an adapter file or folder lies in, if any."""
    if runs_dir is None or not adapter_path:
        return None
    try:
        rel = Path(adapter_path).resolve().relative_to(runs_dir.resolve())
    except ValueError:
        return None
    return rel.parts[0] if rel.parts and _RUN_NAME.fullmatch(rel.parts[0]) else None


def list_runs(runs_dir: Path) -> list[dict]:
    """Every sub-folder that looks like a run (it has a loss log, a model card or metadata), newest first."""
    if not runs_dir.is_dir():
        return []
    out = []
    for folder in runs_dir.iterdir():
        if not (folder.is_dir() and _RUN_NAME.fullmatch(folder.name) and _inside(folder, runs_dir)):
            continue
        has = {"losses": (folder / LOSSES).is_file(), "card": (folder / CARD).is_file(),
               "report": (folder / REPORT_DIR / "report.json").is_file(), "metadata": (folder / METADATA).is_file()}  # fmt: skip
        if any(has.values()):
            out.append(
                {"name": folder.name, "modified": folder.stat().st_mtime, **has, "progress": run_progress(folder)}
            )
    return sorted(out, key=lambda r: -r["modified"])


def read_losses(path: Path) -> list[list[float]]:
    """[[step, loss], ...] from the per-step log. A run still training may be mid-way through writing its last
    line, so an unreadable or non-finite line is skipped rather than failing the whole curve."""
    points = []
    for line in (_run_text(path, limit=MAX_LOSS_LOG_BYTES) or "").splitlines():
        try:
            row = json.loads(line)
            step, loss = int(row["step"]), float(row["loss"])
        except _DAMAGED:
            continue
        if math.isfinite(loss):
            points.append([step, loss])
    if len(points) > MAX_LOSS_POINTS:
        stride = math.ceil(len(points) / MAX_LOSS_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points


def describe_run(folder: Path) -> dict:
    """What the page shows for one run; file paths are relative to the run (fetch them via `/files/`)."""
    samples = []
    sample_root = folder / SAMPLES
    if sample_root.is_dir():
        for step_dir in sorted(sample_root.iterdir()):
            match = re.fullmatch(r"step_(\d+)", step_dir.name)
            if match and step_dir.is_dir():
                files = sorted(f"{SAMPLES}/{step_dir.name}/{f.name}" for f in step_dir.iterdir()
                               if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))  # fmt: skip
                samples.append({"step": int(match.group(1)), "files": files})
    report = folder / REPORT_DIR
    has_card = (folder / CARD).is_file()
    return {
        "name": folder.name,
        "losses": read_losses(folder / LOSSES),
        "samples": samples,
        "card": CARD if has_card else None,
        "card_text": card_text(folder) if has_card else None,
        "report_json": f"{REPORT_DIR}/report.json" if (report / "report.json").is_file() else None,
        "report_html": f"{REPORT_DIR}/report.html" if (report / "report.html").is_file() else None,
        "metadata": _read_object(folder / METADATA, folder),
        "progress": run_progress(folder),
    }


def card_text(folder: Path) -> str:
    """The model card as the page shows it: local absolute paths (this machine's, meaningless to a reader) become
    relative to the run folder when inside it ("." for the folder itself), else just their last name."""
    text = (_run_text(folder / CARD, limit=4 * MAX_CARD_CHARS) or "")[:MAX_CARD_CHARS]
    roots = {str(folder), str(folder.resolve())}

    def short(match: re.Match) -> str:
        path = match.group(0).rstrip(".")  # a full stop after a path ends the sentence
        tail = match.group(0)[len(path) :]
        for root in roots:
            if path == root:
                return "." + tail
            if path.startswith(root + "/"):
                return path[len(root) + 1 :] + tail
        return (PurePosixPath(path).name or path) + tail

    return _ABS_PATH.sub(short, text)


def run_progress(folder: Path) -> dict | None:
    """How far the run got: {state, step, max_steps, checkpoint}, None for a folder nothing was trained in.
    `training` while a trainer holds the folder's lock; `finished` once training_metadata.json (written at the end,
    with the adapter) is this run's and reaches train.max_steps (a finished run resumed to train further is not);
    else `interrupted`, or `unfinished` where the lock cannot be checked (no /proc/locks)."""
    saved = [p for p in layout.checkpoints(folder) if (p / layout.PROGRESS).is_file()]
    checkpoint = layout.checkpoint_step(saved[-1]) if saved else None
    step = max(_last_logged_step(folder / LOSSES) or 0, checkpoint or 0)
    config = _read_yaml(folder / layout.CONFIG, folder)
    target = config.get("train", {}).get("max_steps") if isinstance(config.get("train"), dict) else None
    if not isinstance(target, int) and saved:  # the checkpoint records its run's target too
        target = (_read_object(saved[-1] / layout.PROGRESS, folder) or {}).get("max_steps")
    target = target if isinstance(target, int) else None
    meta = _read_object(folder / METADATA, folder) or {}
    owner = (_read_object(folder / layout.RUN_ID, folder) or {}).get("run_id")
    ended = meta.get("steps") if isinstance(meta.get("steps"), int) and meta.get("run_id") in (None, owner) else None
    live = trainer_alive(folder / layout.LOCK)
    if live:
        state = "training"
    elif ended is not None and (target is None or ended >= target):
        state, step, target = "finished", max(step, ended), target or ended
    elif step:
        state = "interrupted" if live is False else "unfinished"
    else:
        return None
    return {"state": state, "step": step, "max_steps": target, "checkpoint": checkpoint}


def trainer_alive(lock: Path) -> bool | None:
    """Whether a process holds `lock` (the trainer flocks it while it runs; the kernel drops it when the process
    ends), read from /proc/locks: looking takes no lock, as even a brief one could refuse a trainer starting then.
    None where that table cannot be read."""
    try:
        st = lock.stat()
    except FileNotFoundError:
        return False  # every trainer creates it: none has run here since the folder was made
    except OSError:
        return None
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2156899 0 EOF" (device in hex)
        for field in line.split():
            parts = field.split(":")
            if len(parts) == 3 and all(parts):
                try:
                    if (int(parts[0], 16), int(parts[1], 16), int(parts[2])) == wanted:
                        return True
                except ValueError:
                    continue
    return False


def _last_logged_step(path: Path) -> int | None:
    """The step of the loss log's last complete line, read from its end (a long run's log runs to megabytes)."""
    try:
        if not _readable(path, path.parent):
            return None
        with path.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 4096, 0))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except _DAMAGED:
            continue
    return None


def _read_object(path: Path, root: Path) -> dict | None:
    """A JSON file's object, or None when missing, broken or of another shape (the rest of the run stays readable).
    Non-finite numbers read as null: a JSON response cannot carry them."""
    try:
        data = json.loads(_run_text(path, root), parse_constant=_finite, parse_float=_finite)
    except _DAMAGED:  # None (not readable) is a TypeError
        return None
    return data if isinstance(data, dict) else None


def _finite(text: str) -> float | None:
    number = float(text)  # NaN, Infinity, or past float's range (1e400): not finite
    return number if math.isfinite(number) else None


def _read_yaml(path: Path, root: Path) -> dict:
    try:
        data = yaml.safe_load(_run_text(path, root) or "")
    except (yaml.YAMLError, *_DAMAGED):  # a YAML date out of range raises ValueError
        return {}
    return data if isinstance(data, dict) else {}
