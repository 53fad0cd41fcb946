"""Preemption: SIGTERM or SIGINT ends a run with a checkpoint instead of losing the steps since the last one.

The handler only records the signal. After every optimizer step the ranks all-reduce that flag (a lone process
reads its own), so they stop at the same step, write one checkpoint together and exit with EXIT_PREEMPTED. A
second SIGINT (Ctrl-C twice) stops at once. Under `accelerate launch` the trainer also asks Linux for SIGTERM
when its launcher dies (PR_SET_PDEATHSIG): accelerate's single-process launcher does not forward SIGTERM, so
without this a killed launcher would leave the trainer running, orphaned, still writing to output_dir.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from pathlib import Path

import torch

from qwen_image_lora.errors import UserError
from qwen_image_lora.train import early

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; rerun with --resume latest
_PR_SET_PDEATHSIG = 1
_LAUNCHERS = ("accelerate", "torch.distributed.run", "torchrun")


class Preempted(UserError):
    """The run stopped on a signal after saving a checkpoint."""

    exit_code, prefix = EXIT_PREEMPTED, ""


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if _die_with_launcher():
            self.received = signal.SIGTERM  # the launcher was already gone

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        if self.received is None:
            self.received = signum
            if not early.is_main_rank():  # every rank gets the launcher's signal; the main one says it
                return
            # os.write, not print: a handler may interrupt a print already in progress on stderr. Its reader may be
            # gone with the same Ctrl-C (`| tee`): the checkpoint is what matters then.
            with contextlib.suppress(BrokenPipeError):
                os.write(
                    2,
                    f"received {signal.Signals(signum).name}: stopping after this optimizer step with a "
                    "checkpoint (Ctrl-C again to stop at once)\n".encode(),
                )

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank got a signal; call once per optimizer step on all ranks. A single
        process has no one to agree with: its own flag, without a collective or a device sync."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"


def _die_with_launcher() -> bool:
    """Under a launcher, have the kernel send us SIGTERM when it dies. True if it is already gone."""
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # not Linux: nothing to ask for
        return False
    if not any(name in cmdline for name in _LAUNCHERS):
        return False  # started from a shell: `nohup python train/lora.py ...` must outlive it
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    return os.getppid() != parent
