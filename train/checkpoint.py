"""Resumable, verified checkpoints: a typed progress record plus everything needed to continue the exact run.

    <output_dir>/checkpoints/step-000250/
        adapter/pytorch_lora_weights.safetensors   the LoRA weights, loadable by `load_lora_weights` as they are
        training_state.pt                          optimizer, LR scheduler, EMA, guards, per-rank RNG states
        progress.json                              TrainingProgress (run id, step, seed, sampler cursor, ...)
        config.yaml                                the resolved config of the run that wrote it
        manifest.json                              size + sha256 of every file above; written last

A checkpoint is written into a temporary folder and renamed into place, so a crash leaves either the whole
checkpoint or none; any error while writing is raised (out of space said plainly), never logged and skipped.
The manifest is checked on resume: a damaged or incomplete checkpoint is skipped with a warning naming it.
Rotation keeps the newest `keep_last` checkpoints of the run that writes them and never touches another run's.
`TrainingState` is the one place that knows what a resume restores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import gather_object
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from qwen_image_lora import run_layout as layout
from qwen_image_lora.console import counted
from qwen_image_lora.errors import UserError
from qwen_image_lora.io import atomic_dir, describe_write_error, remove_leftover_temps
from qwen_image_lora.train import adapter
from qwen_image_lora.train.ranks import is_sharded

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
ADAPTER_FILE = Path(layout.ADAPTER) / layout.FINAL_ADAPTER


class CheckpointError(UserError):
    """A checkpoint could not be written or restored completely."""


@dataclass
class TrainingProgress:
    step: int  # optimizer steps done
    seed: int
    max_steps: int
    epoch: int  # sampler cursor: the next batch is (epoch, position)
    position: int
    samples_seen: int = 0
    num_processes: int = 1
    run_id: str = ""  # the run that wrote it ("" for checkpoints from before run ids)
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ RNG

NUMPY_RNG_TYPES = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]  # get_state()'s


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and (when present) every CUDA device's RNG state of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Size and sha256 of every file in `folder`; written last, so its presence means the save finished."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": files}, indent=2))


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256, else what is wrong."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_NAME} (its save did not finish, or a version without manifests wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_NAME} is unreadable ({type(e).__name__})"
    entry = {"size": int, "sha256": str}
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and all(type(e.get(k)) is t for k, t in entry.items()) for e in files.values()
    ):
        return f"{MANIFEST_NAME} is not a list of files with their size and sha256 (edited by hand?)"
    if ADAPTER_FILE.as_posix() not in files or "training_state.pt" not in files:
        return f"{MANIFEST_NAME} does not list the adapter and training state"
    for name, expected in files.items():  # sizes first: cheap, and they catch truncation
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
    for name, expected in files.items():
        if _sha256(folder / name) != expected["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST_NAME} (the file is damaged)"
    return None


# ------------------------------------------------------------------------------------------ saving / loading


class Checkpointer:
    def __init__(self, output_dir: str | Path, keep_last: int):
        self.run = Path(output_dir)
        self.root = self.run / layout.CHECKPOINTS
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return layout.checkpoint_dir(self.run, step)

    def all(self) -> list[Path]:
        """Checkpoint folders of any run, oldest first (temporary folders of an interrupted save are ignored)."""
        return layout.checkpoints(self.run)

    def of_run(self, run_id: str) -> list[Path]:
        """This run's checkpoints, oldest first; one whose progress.json is unreadable belongs to nobody."""
        return [p for p in self.all() if _run_id_of(p) == run_id]

    def remove_leftovers(self) -> list[Path]:
        """Delete the temporary folders a killed save left (`.step-000250.XXXX`); main process, before training."""
        return remove_leftover_temps(self.root, "step-*")

    def resolve(self, resume: str, run_id: str | None = None) -> Path:
        """`latest` (the newest intact checkpoint of run `run_id`, or of any run when None) or a checkpoint
        folder -> the folder. A damaged or incomplete checkpoint is skipped with a warning naming it."""
        if resume != "latest":
            path = Path(resume)
            if not path.exists():  # list the run it points into (RUN/checkpoints/step-N), else this output_dir's
                run = path.parent.parent if path.parent.name == layout.CHECKPOINTS else self.run
                there = [str(p) for p in layout.checkpoints(run)]
                listed = f"checkpoints of {run}: {', '.join(there)}" if there else f"{run} holds no checkpoints"
                raise CheckpointError(f"--resume {resume}: no such folder; {listed} (or --resume latest)")
            if not (path / layout.PROGRESS).is_file():
                raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no {layout.PROGRESS})")
            problem = verify_checkpoint(path)
            if problem:
                raise CheckpointError(f"--resume {resume}: the checkpoint is damaged: {problem}; try --resume latest")
            return path
        skipped = []
        for path in reversed(self.all()):
            owner = _run_id_of(path)
            if run_id is not None and owner is not None and owner != run_id:
                logger.warning(
                    "resume: skipping %s: it belongs to run %s, not to this folder's run %s", path, owner, run_id
                )
                continue
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            logger.warning("resume: skipping damaged checkpoint %s: %s", path, problem)
            skipped.append(path.name)
        if skipped:  # dropping --resume is refused then: the folder still holds this run's (damaged) checkpoints
            raise CheckpointError(
                f"--resume latest: no intact checkpoint (skipped {', '.join(skipped)}) under {self.root}; to start "
                "over, add --overwrite instead (the run is moved aside, nothing is deleted) or choose another output_dir"
            )
        raise CheckpointError(
            f"--resume latest: no checkpoint under {self.root}; to start a new run instead, drop --resume"
        )

    def save(self, progress: TrainingProgress, write_state, config: dict) -> Path:
        """Write one checkpoint atomically, manifest last, and rotate this run's old ones.
        `write_state(folder)` writes the adapter and the training state."""
        path = self.path_for(progress.step)
        try:
            with atomic_dir(path) as tmp:
                write_state(tmp)
                (tmp / layout.PROGRESS).write_text(json.dumps(dataclasses.asdict(progress), indent=2))
                (tmp / layout.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
                write_manifest(tmp)
        except Exception as e:
            previous = self.of_run(progress.run_id)
            kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
            raise CheckpointError(f"checkpoint {path}: {describe_write_error(e, path)}{kept}") from e
        for old in self.of_run(progress.run_id)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def peek(path: str | Path) -> tuple[TrainingProgress, dict]:
        """(progress, saved config) without reading the optimizer state."""
        path = Path(path)
        try:
            return (
                TrainingProgress(**json.loads((path / layout.PROGRESS).read_text())),
                yaml.safe_load((path / layout.CONFIG).read_text()),
            )
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e


def _run_id_of(path: Path) -> str | None:
    try:
        return json.loads((path / layout.PROGRESS).read_text()).get("run_id", "")
    except (OSError, ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------ what a resume restores


class TrainingState:
    """Everything a resume restores, saved and restored here only: the adapter weights, the optimizer, the LR
    scheduler, EMA, the guards' memory, and every rank's RNG and noise-sampler streams. New state that a resume
    must bring back is one more entry in `_components`.

    Under FSDP2 the adapter, the optimizer moments, the EMA and the guards' copies are sharded DTensors: they are
    gathered whole to save (torch.distributed.checkpoint for the optimizer, keyed by parameter name) and each rank
    takes its shard back on restore, so a checkpoint is one set of full tensors whatever the strategy."""

    def __init__(self, accelerator, transformer, optimizer, lr_scheduler, ema, guards, noise):
        self.accelerator, self.transformer, self.noise = accelerator, transformer, noise
        self.optimizer, self.lr_scheduler, self.ema, self.guards = optimizer, lr_scheduler, ema, guards

    def _components(self) -> dict:
        return {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler, "ema": self.ema, "guards": self.guards}

    def save(self, checkpointer: Checkpointer, progress: TrainingProgress, config: dict) -> Path | None:
        """Collective: every rank calls it; the main process writes. Returns the folder on the main process."""
        acc = self.accelerator
        ranks = gather_object([{"rng": capture_rng_state(), "noise": self.noise.state_dict()}])
        weights = adapter.get_lora_state(self.transformer)  # on every rank: under FSDP2 a gather
        state = {name: None if c is None else self._state_of(name, c) for name, c in self._components().items()}
        path = None
        if acc.is_main_process:
            state["ranks"] = ranks

            def write_state(folder: Path) -> None:
                adapter.save_adapter(self.transformer, folder / layout.ADAPTER, weights)
                with open(folder / "training_state.pt", "wb") as f:  # a file object keeps ENOSPC in the error chain
                    torch.save(state, f)

            path = checkpointer.save(progress, write_state, config)
        acc.wait_for_everyone()
        return path

    def _state_of(self, name: str, component):
        if name == "optimizer" and is_sharded(self.transformer):
            return get_optimizer_state_dict(
                self.transformer,
                _unwrapped(component),
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
        return _gathered(component.state_dict())

    def restore(self, path: str | Path) -> TrainingProgress:
        """Load a checkpoint (already verified by `Checkpointer.resolve`) into the live objects."""
        acc, path = self.accelerator, Path(path)
        progress, _ = Checkpointer.peek(path)
        try:
            # Tensors and plain values only: a pickle can run code, and a checkpoint may come from someone else
            # (the manifest proves completeness, not origin). The numpy RNG state is the one array type it holds.
            with torch.serialization.safe_globals(NUMPY_RNG_TYPES):
                state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"resume from {path}: training_state.pt holds objects other than tensors and plain values, which this "
                "toolkit never writes (loading them could run code); resume from a checkpoint this toolkit wrote"
            ) from e
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
        adapter.load_adapter_file(self.transformer, path / layout.ADAPTER)
        sharded = is_sharded(self.transformer)
        for name, component in self._components().items():
            saved = state.get(name)
            if component is None or saved is None:
                continue
            if name == "optimizer" and saved.get("state") and sharded != _keyed_by_name(saved):
                raise CheckpointError(
                    f"resume from {path}: its optimizer state was written "
                    f"{'without' if sharded else 'under'} FSDP; resume it with the launch config "
                    "that wrote it"
                )
            if name == "optimizer" and sharded:
                set_optimizer_state_dict(
                    self.transformer, _unwrapped(component), saved, options=StateDictOptions(full_state_dict=True)
                )
            else:
                component.load_state_dict(_sharded_like(saved, component.state_dict()) if sharded else saved)
        ranks = state["ranks"]
        if len(ranks) != acc.num_processes:
            logger.warning("resume: %s", _process_count_change(progress, len(ranks), acc.num_processes))
        mine = ranks[acc.process_index % len(ranks)]
        restore_rng_state(mine["rng"])
        self.noise.load_state_dict(mine["noise"])
        return progress


def _process_count_change(progress: TrainingProgress, written_by: int, now: int) -> str:
    """What changes when a run resumes on another number of processes: the samples behind each optimizer step (a
    resume keeps the checkpoint's learning rate), and the data order and random streams (reused round-robin)."""
    before = progress.samples_seen // max(progress.step, 1)  # the writer's batch x accumulation x processes
    samples = (
        f"{counted(before // written_by * now, 'sample')} where it averaged {before}"
        if before  # checkpoints from before samples_seen hold 0
        else f"{now}/{written_by} as many samples"
    )
    return (
        f"the checkpoint was written by {counted(written_by, 'process', 'processes')}, this run has {now}: an optimizer step now averages "
        f"{samples} at the checkpoint's learning rate (it is not rescaled), and the data order and random streams "
        "differ from an uninterrupted run's"
    )


def _unwrapped(optimizer):
    """The torch optimizer inside accelerate's wrapper (torch.distributed.checkpoint steps and loads it directly)."""
    return getattr(optimizer, "optimizer", optimizer)


def _keyed_by_name(optimizer_state: dict) -> bool:
    """True for torch.distributed.checkpoint's layout (state keyed by parameter name), False for torch's (by index)."""
    return all(isinstance(key, str) for key in optimizer_state["state"])


def _gathered(tree):
    """`tree` with every sharded DTensor replaced by its whole tensor on CPU (a collective: every rank, same order)."""
    if isinstance(tree, DTensor):
        return tree.full_tensor().cpu()
    if isinstance(tree, dict):
        return {k: _gathered(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_gathered(v) for v in tree)
    return tree


def _sharded_like(saved, live):
    """`saved` (whole tensors) with each tensor where `live` holds a DTensor cut to this rank's shard of it."""
    if isinstance(live, DTensor) and isinstance(saved, torch.Tensor):
        return distribute_tensor(saved.to(live.dtype), live.device_mesh, live.placements, src_data_rank=None)
    if isinstance(live, dict) and isinstance(saved, dict):
        return {k: _sharded_like(v, live.get(k)) for k, v in saved.items()}
    if isinstance(live, (list, tuple)) and isinstance(saved, (list, tuple)) and len(live) == len(saved):
        return type(saved)(_sharded_like(s, v) for s, v in zip(saved, live))
    return saved
