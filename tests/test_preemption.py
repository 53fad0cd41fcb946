"""StopSignal.agreed: one process answers from its own flag without a collective; several agree through one
all-reduce, so a signal on any rank stops them all after the same step (the end-to-end SIGTERM runs are in
test_faults_train.py)."""

import signal

import pytest
import torch

from qwen_image_lora.config import ConfigError
from qwen_image_lora.train import early, ranks
from qwen_image_lora.train.preemption import StopSignal


class FakeAccelerator:
    """`reduce` sums the flag with the other ranks' flags (`others`), as accelerate's all-reduce would."""

    def __init__(self, num_processes: int, others: float = 0.0):
        self.num_processes, self.others, self.reduced = num_processes, others, 0
        self.device = torch.device("cpu")

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.reduced += 1
        return tensor + self.others


@pytest.mark.parametrize("received", [None, signal.SIGTERM])
def test_one_process_answers_from_its_own_flag_without_a_collective(received):
    stop, acc = StopSignal(), FakeAccelerator(1)
    stop.received = received
    assert stop.agreed(acc) is (received is not None)
    assert acc.reduced == 0


@pytest.mark.parametrize(
    ("mine", "others", "stop_now"), [(None, 0.0, False), (signal.SIGTERM, 0.0, True), (None, 1.0, True)]
)
def test_several_processes_stop_when_any_rank_got_a_signal(mine, others, stop_now):
    stop, acc = StopSignal(), FakeAccelerator(2, others)
    stop.received = mine
    assert stop.agreed(acc) is stop_now
    assert acc.reduced == 1  # every step, on every rank: none may wait alone in a collective
    assert stop.name == ("SIGTERM" if mine else "a signal on another rank")


@pytest.mark.parametrize("rank, says", [("0", True), ("1", False)])
def test_the_main_rank_alone_says_a_signal_came_and_every_rank_stops(rank, says, monkeypatch, capfd):
    """Under a 2-process launch both ranks printed "received SIGINT: stopping after this optimizer step"."""
    monkeypatch.setenv("RANK", rank)
    stop = StopSignal()
    stop._handle(signal.SIGINT, None)
    assert stop.received == signal.SIGINT
    assert ("received SIGINT: stopping after this optimizer step" in capfd.readouterr().err) is says


@pytest.mark.parametrize("processes, refused", [(1, False), (2, True)])
def test_processes_that_formed_no_group_are_refused_before_they_train(processes, refused, monkeypatch):
    """A multi-GPU or FSDP launch on a machine without a GPU, without ACCELERATE_USE_CPU=1: each process trained
    alone into the same folder, one lost its lock, and the user saw a SIGTERM and a torch traceback."""
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    if refused:
        with pytest.raises(ConfigError, match="2 processes but they formed no process group .*ACCELERATE_USE_CPU=1"):
            ranks.check_one_group(FakeAccelerator(1))
    else:
        ranks.check_one_group(FakeAccelerator(1))
    ranks.check_one_group(FakeAccelerator(processes))  # a group of them: nothing to say


@pytest.mark.parametrize("rank, status, waits", [("1", 2, True), ("0", 2, False), ("1", 0, False)])
def test_another_rank_ending_on_an_error_waits_for_the_main_one_to_say_why(rank, status, waits, monkeypatch):
    """Under a 2-process launch rank 1 left first on a config error, the launcher stopped rank 0 with SIGTERM, and
    the one `error:` line (the main rank's) was never written (a clean CI run)."""
    monkeypatch.setenv("RANK", rank)
    slept = []
    monkeypatch.setattr(early.time, "sleep", slept.append)
    assert early.after_main_spoke(status) == status
    assert slept == ([early.MAIN_SPEAKS_S] if waits else [])
