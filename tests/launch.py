"""The `accelerate launch` command the launcher tests share (multi-process runs on CPU also need
ACCELERATE_USE_CPU=1 in the environment)."""

from __future__ import annotations

import sys


def accelerate_launch(processes: int, *flags: str) -> list[str]:
    """The launcher's command up to the script: `flags` (e.g. --multi_gpu, --config_file F, -q), `processes` on one
    machine, no mixed precision, no dynamo."""
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", str(processes),
            *"--num_machines 1 --mixed_precision no --dynamo_backend no".split()]  # fmt: skip
