"""Where the data cache lives, checked without torch: `data.cache_dir` refused before a run when a file stands where
its folder must be, and the note about an older version's per-run cache. `qwen-lora validate` asks this in well under a
second; the cache itself is `cache.py`."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from qwen_image_lora.config import CACHE_ENV, ConfigError, default_cache_dir
from qwen_image_lora.io import WriteError, describe_write_error


def check_cache_dir(cache_dir: str | os.PathLike | None) -> None:
    """Refuse a `data.cache_dir` that is, or lies under, a regular file, before a run starts: training would otherwise
    go on without a cache, silently (prepare and the doctor fail at their first write, in these words)."""
    if not cache_dir:
        return
    path = Path(cache_dir)
    for part in (path, *path.parents):
        if part.is_dir():
            return
        if part.exists() or part.is_symlink():  # a file, or a dangling link, where a folder must be
            env = os.environ.get(CACHE_ENV) and str(cache_dir) == default_cache_dir()
            line = describe_write_error(WriteError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)), path)
            raise ConfigError(f"data.cache_dir{f' (${CACHE_ENV})' if env else ''}: {line}", "data.cache_dir")


def old_run_cache_note(output_dir: str | os.PathLike, cache_dir: str | os.PathLike | None) -> str | None:
    """Before one cache was shared by every run, each run kept its own under `<output_dir>/cache`. Such a folder is
    no longer read: a line saying so, and what it holds, or None when there is none (or it is `cache_dir`)."""
    old = Path(output_dir) / "cache"
    if not (old / "shards").is_dir() or (cache_dir and old.resolve() == Path(cache_dir).resolve()):
        return None
    size = sum(p.stat().st_size for p in old.rglob("*") if p.is_file())
    return (
        f"data cache: {old} is an older version's per-run cache ({size / 2**20:.1f} MiB), no longer read; this run "
        f"uses {cache_dir or 'no cache'}. Delete {old} to free the space"
    )
