"""Flow matching on normalised VAE latents, the objective Qwen-Image is trained with.

    x_t    = (1 - s) * x0 + s * noise          s in (0, 1), the pipeline's sigma (= timestep / 1000)
    target = noise - x0                        the velocity the transformer predicts
    loss   = mean over samples of w(s) * mean((pred - target)^2)    on the target tokens only

The timestep `s` is drawn uniformly, logit-normally (SD3) or "shifted": uniform, then moved by the same
exponential time shift the scheduler applies at inference with mu = calculate_shift(image_seq_len), so larger
images train at noisier timesteps exactly as they are sampled. Edit batches add reference-image latents as
clean conditioning tokens; only the target's tokens enter the loss (`predict_velocity` returns only those).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift as pipeline_calculate_shift
from diffusers.training_utils import compute_loss_weighting_for_sd3

from qwen_image_lora import model as qmodel
from qwen_image_lora.errors import InputError


def calculate_shift(seq_len: int, scheduler_config) -> float:
    """The pipeline's own dynamic-shift rule (mu grows linearly with the number of target latents), fed the
    scheduler config's keys exactly as `QwenImage21Pipeline.__call__` feeds them."""
    get = scheduler_config.get
    return pipeline_calculate_shift(
        seq_len,
        get("base_image_seq_len", 256),
        get("max_image_seq_len", 4096),
        get("base_shift", 0.5),
        get("max_shift", 1.15),
    )


def shift_sigmas(u: torch.Tensor, seq_len: int, scheduler_config) -> torch.Tensor:
    """Apply the scheduler's time shift to uniform times `u` ([B] in (0, 1)), as it does to its sigma grid."""
    get = scheduler_config.get
    if get("use_dynamic_shifting", False):
        mu = calculate_shift(seq_len, scheduler_config)
        if get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / u - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    shift = get("shift", 1.0)
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(
    kind: str,
    batch_size: int,
    seq_len: int,
    scheduler_config,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """[B] float32 flow-matching times in (0, 1), drawn on the CPU from `generator` (device-independent)."""
    if kind == "uniform":
        u = torch.rand(batch_size, generator=generator)
    elif kind == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator))
    elif kind == "shifted":
        u = shift_sigmas(torch.rand(batch_size, generator=generator).clamp(1e-6, 1 - 1e-6), seq_len, scheduler_config)
    else:
        raise InputError(
            f"train.timestep_sampling: unknown {kind!r}; use uniform, logit_normal or shifted",
            "train.timestep_sampling",
        )
    return u.float()


def loss_weights(kind: str, sigmas: torch.Tensor) -> torch.Tensor:
    """[B] per-sample loss weights: none, sigma_sqrt (1/s^2) or cosmap (SD3's cosine-map density), by diffusers'
    own `compute_loss_weighting_for_sd3`; sigma_sqrt's s is floored at 1e-3 so a near-clean sample cannot dominate."""
    if kind not in ("none", "sigma_sqrt", "cosmap"):
        raise InputError(
            f"train.loss_weighting: unknown {kind!r}; use none, sigma_sqrt or cosmap", "train.loss_weighting"
        )
    return compute_loss_weighting_for_sd3(kind, sigmas.clamp_min(1e-3) if kind == "sigma_sqrt" else sigmas)


class NoiseSampler:
    """Draws the noise and timesteps of each training step from its own seeded CPU generator, so a run's
    randomness is one saveable state (resume continues the exact sequence) and equal on every device."""

    def __init__(self, seed: int, kind: str, scheduler_config, logit_mean: float = 0.0, logit_std: float = 1.0):
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.kind, self.scheduler_config = kind, scheduler_config
        self.logit_mean, self.logit_std = logit_mean, logit_std

    def draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, C, 1, h, w] -> (noise like latents in fp32 on latents' device, sigmas [B] fp32 there)."""
        b, _, _, h, w = latents.shape
        sigmas = sample_sigmas(
            self.kind, b, h * w, self.scheduler_config, self.generator, self.logit_mean, self.logit_std
        )
        noise = torch.randn(latents.shape, generator=self.generator, dtype=torch.float32)
        return noise.to(latents.device), sigmas.to(latents.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def flow_matching_loss(
    transformer,
    batch,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting: str = "none",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scalar fp32 loss for one batch (`latents` [B,C,1,h,w], `cond_latents` list, `prompt` PromptEmbeds,
    optional `loss_mask` [B,1,1,h,w] of per-latent weights, e.g. from an alpha channel or an edit mask; the loss
    is then the weighted mean). `dtype`: see `model.predict_velocity`."""
    x0 = batch.latents.float()
    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    pred = qmodel.predict_velocity(
        transformer, noisy, batch.prompt, sigmas, list(batch.cond_latents or []), dtype=dtype
    )
    err = (pred.float() - (noise - x0)) ** 2
    mask = getattr(batch, "loss_mask", None)
    if mask is not None:
        mask = mask.to(err).expand_as(err)
        # The weighted mean whatever the weights sum to (soft alpha masks can sum below 1); an all-zero mask gives 0.
        per_sample = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-8)
    else:
        per_sample = err.flatten(1).mean(1)
    return (loss_weights(weighting, sigmas) * per_sample).mean()


@torch.no_grad()
def heldout_loss(transformer, batches: Iterable, seed: int = 0) -> float:
    """Mean flow-matching loss (uniform times, no weighting) over `batches` with noise and timesteps fixed
    per item by `seed`, so the number moves only when the model does. Batches are `Batch`-like objects."""
    was_training = transformer.training
    transformer.eval()
    device = next(transformer.parameters()).device
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            generator = torch.Generator("cpu").manual_seed(seed * 1_000_003 + i)
            b = batch.latents.shape[0]
            sigmas = torch.rand(b, generator=generator).to(device)
            noise = torch.randn(batch.latents.shape, generator=generator, dtype=torch.float32).to(device)
            total += flow_matching_loss(transformer, batch, noise, sigmas).item() * b
            count += b
    finally:
        transformer.train(was_training)
    if not count:
        raise ValueError("heldout_loss: no batches given")
    return total / count
