"""Atomic writes: a temp file (or folder) beside the destination, then one rename, so a crash never leaves
a half-written checkpoint, adapter, image or report behind. Files and folders get the user's umask (as
`open()` would give them), and a write that runs out of space, or finds its folder read-only or not writable, says
so in one line naming the path and the next step."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qwen_image_lora.errors import InputError

# errno -> (what went wrong, what to do); libraries that wrap the OSError (torch's zip writer, safetensors) keep the
# errno in the exception chain or as "(os error N)" in the message.
_WRITABLE = "choose a writable folder for it, or fix that folder's permissions, and retry"
_WRITE_ERRORS = {
    errno.ENOSPC: ("the disk is full (no space left on device)",
                   "free space on that device (or choose another output_dir) and retry"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota (or choose another output_dir) and retry"),
    errno.EFBIG: ("the file is larger than this process (ulimit -f) or file system allows",
                  "raise `ulimit -f`, or choose an output_dir on a file system that takes larger files"),
    errno.EROFS: ("the file system is read-only", _WRITABLE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("the operation is not permitted", _WRITABLE),
    errno.ENOTDIR: ("a part of that path is a file, not a folder", "choose a folder path and retry"),
    errno.EEXIST: ("a file is where its folder should be", "choose a folder path and retry"),
    errno.EISDIR: ("a folder is where the file should be", "choose a file name and retry"),
}  # fmt: skip
# Only writes raise these, so an error carrying one is a write error wherever it was caught.
_ONLY_FROM_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class WriteError(OSError):
    """A write of `filename` (the destination, never a temp file's name) that failed: its folder could not be made
    or written to, or the device ran out of room mid-write. The errno is the original one."""


def _errno_in_chain(error: BaseException | None, codes) -> int | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in codes:
            return error.errno
        m = re.search(r"os error (\d+)\)", str(error))
        if m and int(m.group(1)) in codes:
            return int(m.group(1))
        error = error.__cause__ or error.__context__
    return None


def describe_write_error(error: BaseException, path: str | os.PathLike) -> str:
    """One line for a failed write of `path`: a full disk, a read-only folder, a permission problem or a file in
    the way said plainly with the next step; anything else by its type."""
    # A file in the way (mkdir's ENOTDIR/EEXIST) is known to mean that only from `atomic_path`/`atomic_dir`'s setup.
    skip = () if isinstance(error, WriteError) else (errno.ENOTDIR, errno.EEXIST)
    code = _errno_in_chain(error, [c for c in _WRITE_ERRORS if c not in skip])
    if code is not None:
        reason, next_step = _WRITE_ERRORS[code]
        return f"could not write {path}: {reason}; {next_step}"
    return f"could not write {path}: {type(error).__name__}: {error}"


def is_write_error(error: BaseException) -> bool:
    """True for a write that `describe_write_error` explains: any `WriteError`, and out-of-space or read-only
    errors anywhere (only writes raise those). Permission errors from plain reads are not claimed."""
    return isinstance(error, WriteError) or _errno_in_chain(error, _ONLY_FROM_WRITES) is not None


def affects_every_write(error: BaseException) -> bool:
    """True when the device, not this one file, refused the write (full, over quota or size limit, read-only): the
    next file would fail too, so a loop over many outputs stops instead of failing each one in turn."""
    return _errno_in_chain(error, _ONLY_FROM_WRITES) is not None


@contextlib.contextmanager
def writing_to(path: str | os.PathLike) -> Iterator[None]:
    """Setting up a write of `path` (its folder, a temp or lock file in it): an OSError becomes a `WriteError`
    naming `path`, not the temp file's random name."""
    try:
        yield
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e


@contextlib.contextmanager
def _naming_destination(path: Path) -> Iterator[None]:
    """Inside an atomic write: the device running out of room (whoever raised it, wrapped or not, with the temp
    file's name or none) becomes a `WriteError` naming `path`; any other error passes through unchanged."""
    try:
        yield
    except Exception as e:
        code = _errno_in_chain(e, _ONLY_FROM_WRITES)
        if code is None:
            raise
        raise WriteError(code, os.strerror(code), str(path)) from e


def _umask() -> int:
    # Linux shows the umask in /proc without changing it; elsewhere set-and-restore is the only way to read it.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike) -> None:
    """Before the work that ends in writing `path` (a render, an eval): its folder can be made and written to, and no
    folder sits at `path`. Raises WriteError naming `path` now, not after the work (the folder is made)."""
    path = Path(path)
    with writing_to(path):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp file path in the destination's folder; rename it onto `path` if the block succeeds."""
    path = Path(path)
    with writing_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
        os.close(fd)
    try:
        with _naming_destination(path):
            yield Path(tmp)
            # mkstemp makes 0600, and a writer may replace the temp with its own 0600 file (safetensors does):
            # after the block, so the final file looks like any other.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` (an existing folder is swapped out)."""
    path = Path(path)
    with writing_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with _naming_destination(path):
            yield tmp
            _apply_umask(tmp)  # mkdtemp makes 0700; files inside may be 0600 (safetensors writes them so)
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


def check_ours_to_write(folder: str | os.PathLike, what: str, ours: bool, field: str = "output_dir") -> None:
    """Raise InputError unless `folder` is absent, empty or `ours` (already holds `what`): the builders that write a
    whole folder never overwrite or delete a user's own files."""
    folder = Path(folder)
    if ours or not folder.exists():
        return
    if not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder; give a new folder for {what}", field)
    held = sorted(p.name for p in folder.iterdir())
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise InputError(f"{folder} holds files that are not {what} ({shown}); give an empty or new folder", field)


def _apply_umask(folder: Path) -> None:
    """`folder` and everything in it (links left alone) get the modes `open()`/`mkdir` give under the umask."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


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
        tmp.write_text(text, encoding="utf-8")  # not the locale's: a report's "Δ" failed under LANG=C


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


_LINE_END = re.compile(r"\r\n|\r|\n")


def text_lines(text: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r only: `str.splitlines` also splits at U+2028, U+0085 and the like, which scraped
    captions hold inside a line (a JSONL row with one read as "not valid JSON", a caption as two captions)."""
    return _LINE_END.split(text)


class DuplicateKey(InputError):
    """A JSON object that names a key twice: JSON keeps only the last, so what was meant is unknown."""

    def __init__(self, key: str):
        super().__init__(f"{key!r} given twice; JSON keeps only the last, so keep one")
        self.key = key


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`json.loads`'s object_pairs_hook that refuses a key given twice (`DuplicateKey`)."""
    row = {}
    for key, value in pairs:
        if key in row:
            raise DuplicateKey(key)
        row[key] = value
    return row


def iter_jsonl(
    path: str | os.PathLike, error: type[Exception] = ValueError, bad: list[str] | None = None
) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for each non-blank line; a bad line raises `error` naming it, or with `bad` given is
    added to it and skipped (a reader that reports every bad line at once). UTF-8 (JSON's encoding), with a leading
    byte-order mark allowed (Windows editors write one)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8") from None
    for lineno, line in enumerate(text_lines(text), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line, object_pairs_hook=unique_keys)
            problem = None if isinstance(row, dict) else f"{where}: each line must be a JSON object"
        except json.JSONDecodeError as e:
            problem = f"{where}: not valid JSON ({e.msg})"
        except DuplicateKey as e:
            problem = f"{where}: {e}"
        except ValueError:  # Python's int() past 4,300 digits
            problem = f"{where}: a number of more than 4,300 digits; no field takes one"
        except RecursionError:
            problem = f"{where}: nested too deeply to read; no field is nested past a few levels"
        if problem is None:
            yield where, row
        elif bad is None:
            raise error(problem)
        else:
            bad.append(problem)


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def content_hash(source: str | os.PathLike | bytes) -> str:
    """sha256 of a file's bytes (memoised on path, size and mtime) or of the bytes themselves."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(source).hexdigest()
    path = os.path.abspath(os.fspath(source))
    st = os.stat(path)
    memo_key = (path, st.st_size, st.st_mtime_ns)
    digest = _HASH_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = _HASH_MEMO[memo_key] = h.hexdigest()
    return digest
