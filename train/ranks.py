"""What the processes of a run must agree on: one answer worked out on the main process, one adapter, how FSDP2 shards
the transformer across them, and how they leave together."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
    gather_object,
    parse_flag_from_env,
)
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from qwen_image_lora.config import ConfigError
from qwen_image_lora.train import offload

logger = logging.getLogger(__name__)


def main_then_share(acc, fn):
    """Run `fn` on the main process and give its result, or its error, to every rank: all go on or stop together."""
    outcome = [None]
    if acc.is_main_process:
        try:
            outcome = [(True, fn())]
        except Exception as e:  # raised on every rank below, so no rank waits in a collective forever
            outcome = [(False, e)]
    ok, value = broadcast_object_list(outcome)[0]
    if not ok:
        raise value
    return value


def gather_adapter_hashes(state: dict[str, torch.Tensor]) -> list[str]:
    """Every rank's sha256 of its adapter state, in rank order: DDP in sync gives one value."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].float().numpy().tobytes())
    return gather_object([digest.hexdigest()])


# ------------------------------------------------------------------------------------------ FSDP2


def fsdp_launch() -> bool:
    """True under an FSDP launch (`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP on GPUs and CPU
    alike): the transformer then stays where it loaded until `prepare`, whose `fully_shard` moves one block at a time
    onto the device and keeps only this rank's shard of it, so no rank ever holds the whole base there."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def launched_processes() -> int:
    """How many processes this launch runs (torchrun's WORLD_SIZE, which `accelerate launch` sets), before any
    Accelerator exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_one_group(acc) -> None:
    """The launched processes formed one group: on a machine without a GPU, a multi-GPU or FSDP launch without
    ACCELERATE_USE_CPU=1 started processes that each trained alone, into one output folder (one lost its lock)."""
    if acc.num_processes == 1 and launched_processes() > 1:
        raise ConfigError(
            f"accelerate started {launched_processes()} processes but they formed no process group (no GPU here?); "
            "on CPU, launch with ACCELERATE_USE_CPU=1 accelerate launch ... (gloo)"
        )


def is_sharded(module) -> bool:
    """True when FSDP2 holds `module`'s weights as shards: reading them whole, or running the module, then takes every
    rank (collectives)."""
    return isinstance(module, FSDPModule)


def prepare(acc, model, optimizer):
    """`acc.prepare(model, optimizer)`, with FSDP2 on CPU too: accelerate (1.16) makes an FSDP launch
    DistributedType.FSDP on accelerators only, and on CPU (gloo) wraps the model in DDP without a word."""
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ConfigError(
            "fsdp_config.fsdp_version: 1 is not supported (its saves see one rank's shard); use "
            "fsdp_version: 2 as configs/accelerate/fsdp.yaml does"
        )
    if acc.distributed_type != DistributedType.MULTI_CPU or not fsdp_launch():
        # An offloaded transformer is placed already (`offload.place_transformer`); accelerate's `.to()` would only
        # make diffusers warn that group-offloaded modules don't move.
        model, optimizer = acc.prepare(model, optimizer, device_placement=[not offload.is_offloaded(model), True])
    else:
        optimizer = _fully_shard_on_cpu(acc, model, optimizer)
    if is_sharded(model) and acc.is_main_process:
        logger.info("FSDP2: the transformer is sharded across %d processes", acc.num_processes)
    return model, optimizer


def _fully_shard_on_cpu(acc, model, optimizer):
    """The launch's FSDP2 settings applied as accelerate's `fsdp2_prepare_model` applies them on GPUs: `fully_shard` on
    each block its wrap policy names, then on the whole model; the optimizer moved onto the sharded parameters."""
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables, as accelerate reads them
    if plugin.fsdp_version != 2:
        raise ConfigError("fsdp_config.fsdp_version: only 2 (FSDP2, fully_shard) runs on CPU")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    kwargs = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }
    names = {p: n for n, p in model.named_parameters()}
    plugin.set_auto_wrap_policy(model)
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model) or (lambda module: False)
    for module in reversed(list(model.modules())[1:]):  # inner blocks first, each its own all-gather
        if wraps(module):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    sharded = dict(model.named_parameters())  # fully_shard replaced every parameter with a sharded DTensor one
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[p]] for p in group["params"]]
    return acc.prepare(optimizer)


def exit_process(status: int) -> NoReturn:
    """End the process with `status`. One rank of a multi-process run skips the interpreter's teardown: gloo's worker
    threads outlive `destroy_process_group` (only the ProcessGroup's destructor joins them, and DTensor's caches keep it
    alive), and a worker still releasing a finished collective's tensors takes the GIL. Once Python is finalizing, a
    thread that takes the GIL is ended with pthread_exit, whose unwinding through gloo's noexcept loop aborts the process
    ("terminate called without an active exception"). The atexit hooks still run and the streams are flushed."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(status)
    if status == 0:  # every rank is past its last collective; after a failure a peer may still wait in one
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)
