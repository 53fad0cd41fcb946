"""The training guards on hand-computed sequences: when a non-finite step is skipped and when it stops the run,
the exact step a smoothed loss counts as diverging, and the not-learning check."""

import math

import pytest
import torch

from qwen_image_lora.config import TrainConfig
from qwen_image_lora.train.guards import Guards, TrainingStopped


def test_non_finite_steps_are_skipped_then_stop_the_run():
    g = Guards(TrainConfig(max_nonfinite_losses=3))
    assert g.step_is_finite(0.5, 1.0) and g.nonfinite == 0
    assert not g.step_is_finite(math.nan, 1.0)
    assert not g.step_is_finite(0.5, math.inf)
    assert g.nonfinite == 2
    with pytest.raises(TrainingStopped, match=r"3 optimizer steps .* \(train.max_nonfinite_losses=3\)") as stop:
        g.step_is_finite(-math.inf, 1.0)
    assert "Try a lower optim.lr, train.mixed_precision=bf16 instead of fp16, or check the data" in str(stop.value)


def _fed(losses, factor=2.0) -> Guards:
    g = Guards(TrainConfig(divergence_factor=factor))
    for loss in losses:
        g.check_divergence(loss)
    return g


def test_divergence_on_the_smoothed_loss_by_hand():
    # Ten steps at 1.0: running mean 1.0, best 1.0. Then 0.9 * 1 + 0.1 * 11.5 = 2.05 > 2 x 1 stops the run,
    # and 0.9 * 1 + 0.1 * 10.5 = 1.95 does not.
    g = _fed([1.0] * 10)
    assert (g.running, g.best, g.seen) == (1.0, 1.0, 10)
    with pytest.raises(
        TrainingStopped, match=r"running mean 2.05 is above 2.0 x its best 1 \(train.divergence_factor\)"
    ) as stop:
        g.check_divergence(11.5)
    assert "Lower optim.lr, raise optim.warmup_steps, or lower optim.max_grad_norm." in str(stop.value)
    g = _fed([1.0] * 10 + [10.5])
    assert g.running == pytest.approx(1.95) and g.best == 1.0


def test_divergence_needs_strictly_more_than_the_factor():
    at_factor = 0.9 * 1.0 + (1 - 0.9) * 2.0  # the running mean after ten 1.0s and one 2.0
    g = _fed([1.0] * 10 + [2.0], factor=at_factor)
    assert g.running == at_factor  # exactly factor x best, and still running


def test_divergence_waits_for_ten_steps_and_tracks_the_best():
    g = _fed([1.0] * 4 + [100.0])  # 0.9 + 10 = 10.9, but only 5 steps seen
    assert g.running == pytest.approx(10.9) and g.best is None
    g = _fed([4.0] * 10 + [2.0, 2.0])  # 4 -> 3.8 -> 3.62: the best follows the running mean down
    assert g.best == pytest.approx(3.62) and g.running == pytest.approx(3.62)
    g.check_divergence(4.0)  # 0.9 * 3.62 + 0.4 = 3.658: above the best, within 2x
    assert g.best == pytest.approx(3.62) and g.running == pytest.approx(3.658)


def _params(b_value: float):
    return [
        ("blocks.0.attn.to_q.lora_A.weight", torch.nn.Parameter(torch.ones(2, 2))),
        ("blocks.0.attn.to_q.lora_B.weight", torch.nn.Parameter(torch.full((2, 2), b_value))),
    ]


def test_not_learning_is_caught_at_the_configured_step_only():
    g = Guards(TrainConfig(check_learning_after=5))
    g.remember_initial(_params(0.0))
    assert len(g.initial_b) == 1  # lora_B only
    g.check_learning(4, _params(0.0), grad_norm=1.0)  # not the step: nothing happens
    Guards(TrainConfig(check_learning_after=5)).check_learning(5, _params(0.0), 1.0)  # nothing remembered: no check
    with pytest.raises(TrainingStopped, match=r"after 5 steps the LoRA weights \(lora_B\) have not moved") as stop:
        g.check_learning(5, _params(0.0), grad_norm=1.0)
    assert (
        "Check optim.lr (> 0?), that lora.targets match layers the loss reaches, and that the base model is not "
        "frozen into a no-grad mode."
    ) in str(stop.value)
    with pytest.raises(TrainingStopped, match="after 5 steps the gradient norm is 0"):
        g.check_learning(5, _params(0.1), grad_norm=0.0)
    g.check_learning(5, _params(0.1), grad_norm=1.0)
    assert g.initial_b is None  # checked once
    g.check_learning(5, _params(0.0), grad_norm=0.0)  # and never again


def test_state_round_trips():
    g = _fed([1.0] * 10 + [2.0])
    g.step_is_finite(math.nan, 1.0)
    g.remember_initial(_params(0.0))
    h = Guards(TrainConfig(divergence_factor=2.0))
    h.load_state_dict(g.state_dict())
    assert (h.nonfinite, h.running, h.best, h.seen) == (1, pytest.approx(1.1), 1.0, 11)
    assert torch.equal(h.initial_b[0], torch.zeros(2, 2))
