"""Optimizer, learning-rate schedule and an optional EMA of the LoRA weights."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Iterator

import torch
from diffusers.optimization import get_scheduler

from qwen_image_lora.config import ConfigError, OptimConfig

# Optional optimizers: config name -> (import name, pip package).
PRODIGY_DEFAULT_LINE = "Using decoupled weight decay"
_OPTIONAL = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt")}


def check_optimizer_available(name: str) -> None:
    """Fail before any weights load when the chosen optimizer's package is missing."""
    if name in _OPTIONAL:
        module, package = _OPTIONAL[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"optim.name: {name!r} needs the {package!r} package: pip install {package}")


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    check_optimizer_available(cfg.name)
    common = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "adamw":
        # The fused kernel (one launch for every tensor, CPU and CUDA) over foreach: ~2% of a LoRA step on CPU.
        return torch.optim.AdamW(params, **common, fused=_fusable(params))
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb  # noqa: PLC0415 - the optim extra, only for its optimizer

        return bnb.optim.AdamW8bit(params, **common)
    if cfg.name == "prodigy":
        import prodigyopt  # noqa: PLC0415 - the optim extra, only for its optimizer

        # Prodigy estimates the step size itself; lr is a multiplier (1.0 is the usual value).
        said = io.StringIO()
        with contextlib.redirect_stdout(said):  # it prints its own default (`decouple=True`) on every run
            optimizer = prodigyopt.Prodigy(params, **common)
        for line in said.getvalue().splitlines():
            if line != PRODIGY_DEFAULT_LINE:  # anything else it prints still shows
                print(line)
        return optimizer
    raise ConfigError(f"optim.name: unknown {cfg.name!r}; use adamw, adamw8bit or prodigy")


def _fusable(params: list[torch.nn.Parameter]) -> bool | None:
    """True where every parameter is a float tensor on CPU or CUDA (torch's fused AdamW covers both); None (torch's
    default, foreach) otherwise."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """diffusers' `get_scheduler`, stepped once per optimizer step (warmup and length in optimizer steps)."""

    return get_scheduler(
        cfg.scheduler, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps
    )


class LoRAEMA:
    """Exponential moving average of the trainable (LoRA) weights: ema = decay * ema + (1 - decay) * w after
    each optimizer step. `swapped_in()` puts the averages into the model for validation and export."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the adapter {len(self.shadow)}")
        self.shadow = [s.to(p.device, torch.float32) for s, p in zip(state["shadow"], self.params)]
