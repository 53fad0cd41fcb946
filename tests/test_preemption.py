"""StopSignal.agreed: one process answers from its own flag without a collective; several agree through one
all-reduce, so a signal on any rank stops them all after the same step (the end-to-end SIGTERM runs are in
test_faults_train.py)."""

import signal

import pytest
import torch

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
