"""Progress of long work (training, data prepare, batch, eval): a tqdm bar on a terminal, and where stderr is not
one (a log file, a job scheduler, nohup) a plain line every `QWEN_LORA_PROGRESS_SECONDS` (default 30) instead of
silence or a log full of carriage returns:

    12:04:31 steps 240/1000 (24%) loss=0.4312 | 0.61 s/step, ETA 0:07:44

    bar = progress_bar(total, desc="steps", unit="step")     # update(n), skip(n), set_postfix(**kw), write(msg), close()
    for item in track(items, desc="prepare", unit="item"): ...
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

INTERVAL_ENV = "QWEN_LORA_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 30.0


def progress_bar(total: int, *, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True, position: int = 0):
    """A tqdm bar when stderr reaches a terminal, else a `LineProgress`; a disabled one prints nothing."""
    if enabled and stderr_reaches_terminal():
        return _TerminalBar(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            position=position,
            ncols=shutil.get_terminal_size().columns,
        )
    return LineProgress(total, desc=desc, unit=unit, initial=initial, enabled=enabled)


def stderr_reaches_terminal() -> bool:
    """stderr is a terminal, or a pipe that our launcher copies byte for byte onto its own terminal stderr:
    `accelerate launch` (1.16+) tees its child's stderr, so the trainer's own isatty() says no to a user watching
    a terminal. Asked of the parent's fd 2 (Linux /proc); anywhere else a pipe means periodic lines."""
    if sys.stderr.isatty():
        return True
    try:
        if not stat.S_ISFIFO(os.fstat(sys.stderr.fileno()).st_mode):
            return False
        parent = Path(f"/proc/{os.getppid()}")
        launched = "accelerate" in (parent / "cmdline").read_bytes().decode(errors="replace")
        return launched and os.readlink(parent / "fd" / "2").startswith(("/dev/pts/", "/dev/tty"))
    except (OSError, ValueError):
        return False


def track(items: Iterable, *, desc: str, unit: str = "it", enabled: bool = True) -> Iterator:
    """Iterate `items` (a sized iterable) with a progress bar."""
    bar = progress_bar(len(items), desc=desc, unit=unit, enabled=enabled)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


class _TerminalBar(tqdm):
    """tqdm, with log lines written above the bar while it is open: they were printed after it, so a checkpoint's
    line read `...| 3/8 [00:00<00:01, loss=3.4590]01:32:50 INFO saved checkpoint ...`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logs_above = logging_redirect_tqdm(tqdm_class=tqdm)
        self._logs_above.__enter__()

    def skip(self, n: int = 1) -> None:
        """Count `n` items that took no work (already done, refused): the rate and ETA are of the worked ones."""
        self.n, self.initial = self.n + n, self.initial + n
        self.last_print_n, self.last_print_t = self.n, self._time()  # the smoothed rate's next step starts here
        self.refresh()

    def close(self) -> None:
        super().close()
        if getattr(self, "_logs_above", None) is not None:
            self._logs_above.__exit__(None, None, None)
            self._logs_above = None


class LineProgress:
    """The tqdm subset the callers use, printing one line per `interval` seconds to stderr (and one at the end)."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        interval: float | None = None,
    ):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = self.initial = initial
        self.interval = _interval() if interval is None else interval
        self.postfix: dict[str, object] = {}
        self.start = self.last = time.monotonic()
        self.printed_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and time.monotonic() - self.last >= self.interval:
            self._print()

    def skip(self, n: int = 1) -> None:
        """Count `n` items that took no work (already done, refused): the rate and ETA are of the worked ones."""
        self.initial += n
        self.update(n)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        """As tqdm's; `refresh` is accepted and moot: a line is only ever printed by `update` or `close`."""
        self.postfix = values

    def write(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.n != self.printed_n:
            self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> str:
        done = self.n - self.initial
        seconds = (time.monotonic() - self.start) / done if done else None
        parts = [f"{self.desc} {self.n}/{self.total}"]
        if self.total:
            parts[0] += f" ({100 * self.n // self.total}%)"
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        if seconds is not None:
            eta = datetime.timedelta(seconds=round(seconds * max(0, self.total - self.n)))
            rate = f"{1 / seconds:.0f} {self.unit}s/s" if seconds < 0.01 else f"{seconds:.3g} s/{self.unit}"  # no 2e-06
            parts.append(f"| {rate}, ETA {eta}")
        return " ".join(parts)

    def _print(self) -> None:
        self.last, self.printed_n = time.monotonic(), self.n
        print(f"{time.strftime('%H:%M:%S')} {self._line()}", file=sys.stderr, flush=True)
