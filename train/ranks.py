"""What the processes of a run must agree on: one answer worked out on the main process, and one adapter."""

from __future__ import annotations

import hashlib

import torch
from accelerate.utils import broadcast_object_list, gather_object


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
