"""Flow-matching objective: timestep sampling against the scheduler's own shift, loss weights, the held-out loss,
and that a few optimizer steps on a fixed batch lower the loss for text-to-image and for edits."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import LoRAConfig
from qwen_image_lora.train import adapter, objective


class _Batch:
    def __init__(self, latents, prompt, cond_latents=()):
        self.latents, self.prompt, self.cond_latents = latents, prompt, list(cond_latents)

    def to(self, device, dtype=None):
        return self


def _photo(w, h, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def batches(tiny_pipe):
    """A t2i batch of 2 and an edit batch of 1, built straight from the model functions."""
    images = [_photo(64, 64, 0), _photo(64, 64, 1)]
    latents = torch.cat([qmodel.encode_latents(tiny_pipe, qmodel.image_to_pixels(tiny_pipe, im)) for im in images])
    prompt = qmodel.pad_prompt_embeds([qmodel.encode_prompt(tiny_pipe, [p]) for p in ("a red qwnbrand bottle", "a mug")])
    src, tgt = _photo(64, 64, 2), _photo(64, 64, 3)
    edit = _Batch(
        qmodel.encode_latents(tiny_pipe, qmodel.image_to_pixels(tiny_pipe, tgt)),
        qmodel.encode_prompt(tiny_pipe, ["replace the background"], [src]),
        [qmodel.encode_latents(tiny_pipe, qmodel.image_to_pixels(tiny_pipe, src))],
    )
    return {"t2i": _Batch(latents, prompt), "edit": edit}


@pytest.fixture
def transformer(tiny_model_dir):
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")


def test_shifted_sigmas_match_the_scheduler_time_shift(tiny_pipe):
    config = tiny_pipe.scheduler.config
    u = torch.linspace(0.05, 0.95, 7)
    for seq_len in (16, 1024, 4096):
        mu = objective.calculate_shift(seq_len, config)
        expected = tiny_pipe.scheduler.time_shift(mu, 1.0, u)
        torch.testing.assert_close(objective.shift_sigmas(u, seq_len, config), expected)
    # Larger images are pushed towards noisier timesteps, as at inference.
    assert (objective.shift_sigmas(u, 4096, config) > objective.shift_sigmas(u, 256, config)).all()


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "shifted"])
def test_sigmas_are_in_range_and_seeded(tiny_pipe, kind):
    draw = lambda: objective.sample_sigmas(kind, 512, 256, tiny_pipe.scheduler.config, torch.Generator().manual_seed(1))  # noqa: E731
    a, b = draw(), draw()
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert ((a > 0) & (a < 1)).all()
    if kind == "logit_normal":
        assert abs(a.median().item() - 0.5) < 0.05  # centred, fewer samples at the ends than uniform
        assert ((a < 0.1) | (a > 0.9)).float().mean() < 0.15


def test_loss_weights():
    s = torch.tensor([0.25, 0.5, 0.75])
    assert torch.equal(objective.loss_weights("none", s), torch.ones(3))
    torch.testing.assert_close(objective.loss_weights("sigma_sqrt", s), torch.tensor([16.0, 4.0, 16 / 9]))
    cosmap = objective.loss_weights("cosmap", s)
    assert cosmap[1] == cosmap.max() and torch.isclose(cosmap[0], cosmap[2])
    with pytest.raises(ValueError, match="train.loss_weighting"):
        objective.loss_weights("nope", s)


def test_noise_sampler_state_round_trips(tiny_pipe):
    latents = torch.zeros(2, 8, 1, 4, 4)
    a = objective.NoiseSampler(3, "logit_normal", tiny_pipe.scheduler.config)
    state = a.state_dict()
    first = a.draw(latents)
    b = objective.NoiseSampler(99, "logit_normal", tiny_pipe.scheduler.config)
    b.load_state_dict(state)
    second = b.draw(latents)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_heldout_loss_is_fixed_per_seed(transformer, batches):
    items = [batches["t2i"], batches["edit"]]
    transformer.train()
    a = objective.heldout_loss(transformer, items, seed=0)
    assert a == objective.heldout_loss(transformer, items, seed=0)
    assert a != objective.heldout_loss(transformer, items, seed=1)
    assert transformer.training  # mode restored


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(transformer, batches, kind):
    batch = batches[kind]
    params = adapter.add_lora(transformer, LoRAConfig(rank=4, alpha=4, targets="all-linear"))
    before = objective.heldout_loss(transformer, [batch] * 4, seed=0)
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    sampler = objective.NoiseSampler(0, "logit_normal", {"use_dynamic_shifting": False})
    for _ in range(20):
        noise, sigmas = sampler.draw(batch.latents)
        loss = objective.flow_matching_loss(transformer, batch, noise, sigmas)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = objective.heldout_loss(transformer, [batch] * 4, seed=0)
    assert after < 0.8 * before, (before, after)
    # Only the LoRA weights moved.
    assert all(not p.requires_grad for n, p in transformer.named_parameters() if "lora_" not in n)
