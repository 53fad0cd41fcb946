"""A run folder belongs to one run. `run.json` names the run that owns `output_dir`; its checkpoints,
`progress.json` and `training_metadata.json` carry the same id. A fresh start in a folder holding another run's
checkpoints or adapter stops before any weights load; `--overwrite` moves that run aside (nothing is deleted).
The per-step loss log lives here too: cut back to the checkpoint on resume, read whole for the run's summary.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_image_lora import run_layout as layout
from qwen_image_lora.config import ConfigError
from qwen_image_lora.errors import UserError
from qwen_image_lora.io import (
    WriteError,
    atomic_write_text,
    describe_write_error,
    remove_leftover_temps,
    writing_to,  # fmt: skip
)

if TYPE_CHECKING:  # a type only: `qwen-lora validate` reads run folders without importing torch
    from qwen_image_lora.train.checkpoint import Checkpointer

logger = logging.getLogger(__name__)

# Files written through `atomic_path` in the folder, whose temps a killed write may leave (`.NAME.XXXX`).
_ATOMIC_FILES = (
    layout.RUN_ID,
    layout.LOSSES,
    layout.CONFIG,
    layout.METADATA,
    layout.CARD,
    layout.ADAPTER,
    layout.FINAL_ADAPTER,
)


def _holds_something(path: Path) -> bool:
    """A file, or a folder with anything in it (an empty `samples/` holds nothing to lose)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


# What a run writes at the top of its folder, besides checkpoints and the adapter.
RUN_WRITES = (layout.CONFIG, layout.CARD, layout.LOSSES, layout.METADATA, layout.SAMPLES)


class RunFolderInUse(UserError):
    """output_dir holds another run; the message offers --resume latest, a new output_dir or --overwrite."""


class RunFinished(UserError):
    """`--resume latest` on a run that already reached train.max_steps: nothing to train (the trainer exits 0)."""

    exit_code, prefix = 0, ""


def check_not_nested(output_dir: str | Path) -> None:
    """A run's folder is not inside another run's folder, nor holds one (an --overwrite would move it aside too)."""
    path = Path(output_dir)
    outer = layout.run_holding(path.resolve().parent)
    if outer is not None:
        raise RunFolderInUse(
            f"output_dir {path} lies inside the folder of run {RunFolder(outer).owner() or '?'} ({outer}); "
            "choose an output_dir outside it"
        )
    inner = next((p.parent for pattern in ("*/" + layout.RUN_ID, "*/*/" + layout.RUN_ID) for p in path.glob(pattern)),
                 None)  # fmt: skip
    if inner is not None:
        raise RunFolderInUse(f"output_dir {path} holds the folder of another run ({inner}); choose a folder of its own")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class RunFolder:
    def __init__(self, path: str | Path, keep: str | Path | None = None):
        """`keep`: a folder inside `path` that is not the run's (the shared data cache): never moved aside."""
        self.path = Path(path)
        self.keep = Path(keep).resolve() if keep else None
        self._lock = None

    def lock(self) -> None:
        """Hold the folder for this process: a second trainer (a --resume or --overwrite while this run lives) is
        refused instead of interleaving its checkpoints and losses with ours. Released by `unlock` or at exit."""
        with writing_to(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / layout.LOCK, "a+")  # noqa: SIM115 (held until `unlock`)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            handle.close()
            raise RunFolderInUse(
                f"output_dir {self.path} is in use by a live trainer (pid {pid}); wait for it to end, or stop it "
                f"(kill -TERM {pid} saves a checkpoint) and then add --resume latest"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def owner(self) -> str | None:
        """The id of the run that owns this folder, None when none has claimed it."""
        return self._record().get("run_id")

    def tracking_id(self) -> str | None:
        """The tracker's run id for this folder's run (W&B's `id`): the run id where the run started, another where a
        checkpoint continues in a new folder, so the two histories never share one W&B run."""
        return self._record().get("tracking_id") or self.owner()

    def _record(self) -> dict:
        try:
            record = json.loads((self.path / layout.RUN_ID).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def has_run(self) -> bool:
        """Whether a run has left checkpoints or an adapter here."""
        return bool(self._traces())

    def _traces(self) -> list[str]:
        """What marks the folder as used by a run: its checkpoints and its adapter."""
        traces = []
        checkpoints = layout.checkpoints(self.path)
        if checkpoints:
            traces.append(f"checkpoints up to {checkpoints[-1].name}")
        if (self.path / layout.FINAL_ADAPTER).is_file():
            traces.append(f"a finished adapter ({layout.FINAL_ADAPTER})")
        return traces

    def check_fresh_start(self, overwrite: bool) -> None:
        """Before loading weights: a new run may not mix its files with another run's, nor nest with another's folder."""
        check_not_nested(self.path)
        traces = self._traces()
        if traces and not overwrite:
            run = f"run {self.owner()}" if self.owner() else "another run"
            raise RunFolderInUse(
                f"output_dir {self.path} already holds {run} ({', '.join(traces)}). To continue it, add "
                "--resume latest; to start a new run, choose another output_dir, or add --overwrite to move the old "
                f"run aside to {self._aside_path()} (nothing is deleted)"
            )
        # Files of the names a run writes, in a folder no run has claimed: the user's own (a project folder's
        # config.yaml and README.md were replaced by the resolved config and the model card, silently).
        clashing = [name for name in RUN_WRITES if not traces and _holds_something(self.path / name)]
        if clashing and self.owner() is None:
            raise RunFolderInUse(
                f"output_dir {self.path} holds {', '.join(clashing)}, which no run wrote (there is no "
                f"{layout.RUN_ID}); a run writes files of these names and would replace them. Choose an empty or new "
                "output_dir"
            )

    def _aside_path(self) -> Path:
        base = self.path.with_name(f"{self.path.name}.{self.owner() or 'previous'}")
        candidate, n = base, 1
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        return candidate

    def move_aside(self) -> Path | None:
        """Move the old run's files (everything but `keep`) to a sibling folder; main process only."""
        if not self._traces():
            return None
        aside = self._aside_path()
        aside.mkdir(parents=True)
        for entry in sorted(self.path.iterdir()):
            if entry.name != layout.LOCK and (self.keep is None or entry.resolve() != self.keep):
                os.replace(entry, aside / entry.name)
        logger.warning("--overwrite: moved the previous run in %s to %s", self.path, aside)
        return aside

    def open(
        self, resume: str | None, overwrite: bool, checkpointer: Checkpointer, max_steps: int | None = None
    ) -> tuple[Path | None, str]:
        """Main process, before any weights load: tidy the folder, pick the checkpoint to resume (with `latest`, only
        this folder's run's, and `RunFinished` when that run already reached `max_steps`), and record which run owns
        the folder. Returns (checkpoint or None, run id)."""
        try:
            return self._open(resume, overwrite, checkpointer, max_steps)
        except WriteError as e:  # read-only, not writable, a file in the way: name it before any weights load
            raise ConfigError(f"output_dir: {describe_write_error(e, e.filename)}") from e

    def _open(
        self, resume: str | None, overwrite: bool, checkpointer: Checkpointer, max_steps: int | None
    ) -> tuple[Path | None, str]:
        self.lock()
        self.remove_leftovers(checkpointer)
        if resume:
            owner = self.owner()
            finished = self.finished_at() if resume == "latest" and max_steps is not None else None
            if finished is not None and finished >= max_steps:  # else it continues from its last step's checkpoint
                raise RunFinished(
                    f"run {owner} in {self.path} already finished at step {finished} (train.max_steps={max_steps}); "
                    f"its adapter is {self.path / layout.FINAL_ADAPTER}. Nothing to resume; to train further, raise "
                    "train.max_steps"
                )
            path = checkpointer.resolve(resume, owner if resume == "latest" else None)
            run_id = checkpointer.peek(path)[0].run_id or owner or new_run_id()
            self._check_resume_here(resume, path, run_id, owner)
            # this folder's own history keeps its tracker run; a continuation in a new folder starts its own
            tracking = self.tracking_id() if owner == run_id else f"{run_id}-{uuid.uuid4().hex[:6]}"
        else:
            if overwrite:
                self.move_aside()
            path, run_id = None, new_run_id()
            tracking = run_id
        record = {"run_id": run_id, "started": time.time(), "tracking_id": tracking}
        atomic_write_text(self.path / layout.RUN_ID, json.dumps(record))
        return path, run_id

    def _check_resume_here(self, resume: str, checkpoint: Path, run_id: str, owner: str | None) -> None:
        """A checkpoint of another folder's run may continue in a new folder or its own, never over this folder's run
        (which would mix two runs' checkpoints, losses and adapters under one id)."""
        here, step = checkpoint.resolve().is_relative_to(self.path.resolve()), layout.checkpoint_step(checkpoint) or 0
        newer = [p.name for p in layout.checkpoints(self.path) if (layout.checkpoint_step(p) or 0) > step]
        if resume != "latest" and here and newer:  # its old steps' checkpoints and losses would interleave the new
            raise RunFolderInUse(
                f"--resume {resume}: output_dir {self.path} holds later checkpoints of the run ({', '.join(newer)}), "
                "so going back would mix two histories in one folder. Continue from that checkpoint in a new "
                "output_dir, or use --resume latest"
            )
        traces = self._traces()
        if not traces or run_id == owner or here:
            return
        home = checkpoint.parent.parent if checkpoint.parent.name == layout.CHECKPOINTS else checkpoint.parent
        raise RunFolderInUse(
            f"output_dir {self.path} already holds {f'run {owner}' if owner else 'another run'} ({', '.join(traces)}), "
            f"and --resume {resume} continues run {run_id}. Continue that run in its own output_dir ({home}) or a new "
            "one; to continue this folder's run, use --resume latest"
        )

    def finished_at(self) -> int | None:
        """The step at which this folder's run wrote its adapter and metadata, None while it has not finished."""
        try:
            meta = json.loads((self.path / layout.METADATA).read_text())
        except (OSError, ValueError):
            return None
        if (
            not isinstance(meta, dict)
            or meta.get("run_id") != self.owner()
            or not (self.path / layout.FINAL_ADAPTER).is_file()
        ):
            return None
        return meta["steps"] if isinstance(meta.get("steps"), int) else None

    def remove_leftovers(self, checkpointer: Checkpointer) -> None:
        """Temp files and folders of writes a killed process never finished; main process, before training."""
        removed = checkpointer.remove_leftovers()
        for name in _ATOMIC_FILES:
            removed += remove_leftover_temps(self.path, name)
        for path in removed:
            logger.warning("removed %s, left by a save that did not finish", path)

    # -------------------------------------------------------------------------------------- the loss log

    def read_losses(self) -> list[dict]:
        """Every complete row of losses.jsonl; a half-written line (a kill mid-append) is skipped."""
        log = self.path / layout.LOSSES
        if not log.is_file():
            return []
        rows = []
        for line in log.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def trim_losses(self, step: int) -> None:
        """Keep the rows up to `step` (the checkpoint a run resumes from; 0 for a fresh run), atomically."""
        if (self.path / layout.LOSSES).exists():
            keep = [r for r in self.read_losses() if r["step"] <= step]
            atomic_write_text(self.path / layout.LOSSES, "".join(json.dumps(r) + "\n" for r in keep))

    def append_loss(self, row: dict) -> None:
        # A full disk is said naming losses.jsonl (a plain OSError from write() names no file).
        with writing_to(self.path / layout.LOSSES), open(self.path / layout.LOSSES, "a") as f:
            f.write(json.dumps(row) + "\n")
