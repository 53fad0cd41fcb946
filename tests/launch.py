"""The `accelerate launch` command the launcher tests share (multi-process runs on CPU also need
ACCELERATE_USE_CPU=1 in the environment), and a real service run in a thread for the tests that need its socket."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time


def accelerate_launch(processes: int, *flags: str) -> list[str]:
    """The launcher's command up to the script: `flags` (e.g. --multi_gpu, --config_file F, -q), `processes` on one
    machine, no mixed precision, no dynamo, and a free rendezvous port: the suite runs in parallel workers, and two
    launches on accelerate's default 29500 at once would refuse each other."""
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", str(processes),
            "--main_process_port", str(_free_port()),
            *"--num_machines 1 --mixed_precision no --dynamo_backend no".split()]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:  # released just before the launcher binds it
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(server):
    """A `service.make_server` server serving in a thread until the block ends."""
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "the service did not start"
            time.sleep(0.05)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=30)
