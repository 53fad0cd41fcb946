"""Atomic writes: a temp file (or folder) beside the destination, then one rename, so a crash never leaves
a half-written checkpoint, adapter, image or report behind. Files and folders get the user's umask (as
`open()` would give them), and a write that runs out of space says so, naming the path."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# errno -> what to tell the user; libraries that wrap the OSError (torch's zip writer, safetensors) keep the
# errno in the exception chain or as "(os error N)" in the message.
_NO_SPACE = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit is exceeded",
}


def no_space_reason(error: BaseException) -> str | None:
    """'the disk is full ...' when `error` (or one it was raised from) is an out-of-space write, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return _NO_SPACE[error.errno]
        m = re.search(r"os error (\d+)\)", str(error))
        if m and int(m.group(1)) in _NO_SPACE:
            return _NO_SPACE[int(m.group(1))]
        error = error.__cause__ or error.__context__
    return None


def describe_write_error(error: BaseException, path: str | os.PathLike) -> str:
    """One line for a failed write of `path`: out of space said plainly, anything else by its type."""
    reason = no_space_reason(error)
    if reason:
        return f"could not write {path}: {reason}; free space on that device (or choose another output_dir) and retry"
    return f"could not write {path}: {type(error).__name__}: {error}"


def _umask() -> int:
    # Linux shows the umask in /proc without changing it; elsewhere set-and-restore is the only way to read it.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp file path in the destination's folder; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file should look like any other
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` (an existing folder is swapped out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftover_temps(folder: str | os.PathLike, name: str) -> list[Path]:
    """Delete the temp files/folders `atomic_path`/`atomic_dir` left for `name` in `folder` when a process was
    killed mid-write (`.name.XXXX`); returns what was removed. Call only when no other writer is active."""
    removed = []
    for p in sorted(Path(folder).glob(f".{name}.*")) if Path(folder).is_dir() else []:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def iter_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for each non-blank line; a bad line raises `error` naming it."""
    path = Path(path)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{where}: each line must be a JSON object")
        yield where, row
