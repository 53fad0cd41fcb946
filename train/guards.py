"""Guards against the silent failures of a long run: non-finite losses, an adapter that does not learn, and a
loss that diverges. Each check gets values already reduced across processes, so every rank decides alike and
a stop never leaves one rank waiting in a collective.
"""

from __future__ import annotations

import math

import torch

from qwen_image_lora.config import TrainConfig
from qwen_image_lora.console import counted
from qwen_image_lora.errors import UserError


class TrainingStopped(UserError):
    """A guard stopped the run; the message says what was seen and what to try."""

    exit_code, prefix = 3, "training stopped: "


class Guards:
    # Divergence is judged on an exponential moving average of the loss once it has this many steps behind it.
    SMOOTHING = 0.9
    WARMUP = 10

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.nonfinite = 0
        self.running: float | None = None
        self.best: float | None = None
        self.seen = 0
        self.initial_b: list[torch.Tensor] | None = None

    def remember_initial(self, named_params) -> None:
        """Keep the adapter's initial lora_B weights (all zero for peft's default init) to see if they move."""
        self.initial_b = [p.detach().clone() for n, p in named_params if "lora_B" in n]

    def step_is_finite(self, loss: float, grad_norm: float) -> bool:
        """False (and counted) when this optimizer step's loss or gradient norm is NaN/inf: skip the step.
        Stops after `train.max_nonfinite_losses` such steps."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        self.nonfinite += 1
        if self.nonfinite >= self.cfg.max_nonfinite_losses:
            raise TrainingStopped(
                f"{self.nonfinite} optimizer steps had a non-finite loss or gradient (last loss {loss}, grad norm "
                f"{grad_norm}); stopping (train.max_nonfinite_losses={self.cfg.max_nonfinite_losses}). Try a lower "
                "optim.lr, train.mixed_precision=bf16 instead of fp16, or check the data for broken images."
            )
        return False

    def check_learning(self, step: int, named_params, grad_norm: float) -> None:
        """At step `train.check_learning_after`: the LoRA weights must have moved and the gradient be non-zero."""
        if step != self.cfg.check_learning_after or self.initial_b is None:
            return
        current = [p.detach() for n, p in named_params if "lora_B" in n]
        moved = any(not torch.equal(c.to(i.device), i) for c, i in zip(current, self.initial_b))
        if not moved or grad_norm == 0.0:
            what = (
                "the LoRA weights (lora_B) have not moved from their initial values"
                if not moved
                else "the gradient norm is 0"
            )
            raise TrainingStopped(
                f"after {counted(step, 'step')} {what}: the adapter is not learning (train.check_learning_after={step}). "
                "Check optim.lr (> 0?), that lora.targets match layers the loss reaches, and that the base "
                "model is not frozen into a no-grad mode."
            )
        self.initial_b = None  # checked once; no need to keep the copy

    def check_divergence(self, loss: float) -> None:
        """Stop when the smoothed loss climbs above `train.divergence_factor` times the best it has been."""
        self.seen += 1
        self.running = loss if self.running is None else self.SMOOTHING * self.running + (1 - self.SMOOTHING) * loss
        if self.seen < self.WARMUP:
            return
        self.best = self.running if self.best is None else min(self.best, self.running)
        if self.running > self.cfg.divergence_factor * self.best:
            raise TrainingStopped(
                f"the loss is diverging: its running mean {self.running:.4g} is above "
                f"{self.cfg.divergence_factor} x its best {self.best:.4g} (train.divergence_factor). Lower optim.lr, "
                "raise optim.warmup_steps, or lower optim.max_grad_norm."
            )

    def state_dict(self) -> dict:
        return {
            "nonfinite": self.nonfinite,
            "running": self.running,
            "best": self.best,
            "seen": self.seen,
            "initial_b": self.initial_b,
        }

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite, self.running, self.best, self.seen = (
            state["nonfinite"],
            state["running"],
            state["best"],
            state["seen"],
        )
        self.initial_b = state["initial_b"]
