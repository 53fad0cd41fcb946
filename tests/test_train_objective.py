"""Flow-matching objective: known answers against the pipeline's scheduler (noised input, target, Euler step,
timestep convention), timestep sampling against the scheduler's own shift, loss weights, the held-out loss,
and that a few optimizer steps on a fixed batch lower the loss for text-to-image and for edits."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift as pipeline_shift
from diffusers.training_utils import compute_loss_weighting_for_sd3
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora import objective
from qwen_image_lora.config import LoRAConfig
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.train import adapter


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
    prompt = qmodel.pad_prompt_embeds(
        [qmodel.encode_prompt(tiny_pipe, [p]) for p in ("a red qwnbrand bottle", "a mug")]
    )
    src, tgt = _photo(64, 64, 2), _photo(64, 64, 3)
    edit = _Batch(
        qmodel.encode_latents(tiny_pipe, qmodel.image_to_pixels(tiny_pipe, tgt)),
        qmodel.encode_prompt(tiny_pipe, ["replace the background"], [src]),
        [qmodel.encode_latents(tiny_pipe, qmodel.image_to_pixels(tiny_pipe, src))],
    )
    return {"t2i": _Batch(latents, prompt), "edit": edit}


@pytest.fixture
def transformer(tiny_model_dir):

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


_SHIFT_CONFIGS = [
    {},  # every key at the pipeline's default
    {"base_image_seq_len": 64, "max_image_seq_len": 1024, "base_shift": 0.3, "max_shift": 2.0},
]


def test_calculate_shift_is_the_pipelines(tiny_pipe):

    for config in [tiny_pipe.scheduler.config, *_SHIFT_CONFIGS]:
        get = config.get  # the defaults QwenImage21Pipeline.__call__ reads the scheduler config with
        keys = [
            get("base_image_seq_len", 256),
            get("max_image_seq_len", 4096),
            get("base_shift", 0.5),
            get("max_shift", 1.15),
        ]
        for seq_len in (16, 256, 1024, 4096):
            assert objective.calculate_shift(seq_len, config) == pytest.approx(pipeline_shift(seq_len, *keys)), (
                config,
                seq_len,
            )


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("extra", _SHIFT_CONFIGS)
def test_dynamic_shift_is_the_schedulers(shift_type, extra):
    config = {**extra, "use_dynamic_shifting": True, "time_shift_type": shift_type}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    u = torch.linspace(0.05, 0.95, 7)
    mu = objective.calculate_shift(1024, scheduler.config)
    torch.testing.assert_close(objective.shift_sigmas(u, 1024, scheduler.config), scheduler.time_shift(mu, 1.0, u))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_is_the_schedulers(shift):
    """Without dynamic shifting the scheduler shifts its own training grid by `shift`; ours must agree."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    grid = torch.linspace(1, 1000, 1000).flip(0) / 1000  # the unshifted grid it starts from
    config = {"shift": shift} if shift != 1.0 else {}  # 1.0 is the default
    torch.testing.assert_close(objective.shift_sigmas(grid, 4096, config), scheduler.sigmas[:1000].float())


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "shifted"])
def test_sigmas_are_in_range_and_seeded(tiny_pipe, kind):
    draw = lambda: objective.sample_sigmas(kind, 512, 256, tiny_pipe.scheduler.config, torch.Generator().manual_seed(1))  # noqa: E731
    a, b = draw(), draw()
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert ((a > 0) & (a < 1)).all()
    if kind == "logit_normal":
        assert abs(a.median().item() - 0.5) < 0.05  # centred, fewer samples at the ends than uniform
        assert ((a < 0.1) | (a > 0.9)).float().mean() < 0.15


def test_shifted_sigmas_spread_like_the_shifted_median(tiny_pipe):
    config = tiny_pipe.scheduler.config
    a = objective.sample_sigmas("shifted", 2048, 1024, config, torch.Generator().manual_seed(2))
    assert a.std() > 0.15  # not collapsed onto one value
    median = objective.shift_sigmas(torch.tensor([0.5]), 1024, config)
    assert abs(a.median() - median) < 0.05
    with pytest.raises(ValueError, match="train.timestep_sampling: unknown 'cosine'"):
        objective.sample_sigmas("cosine", 2, 16, config, torch.Generator())


@pytest.mark.parametrize("kind", ["logit_normal", "shifted"])
def test_noise_sampler_draws_the_sigmas_then_the_noise_from_its_seed(tiny_pipe, kind):
    """The sampler's draw is sample_sigmas for these latents (seq_len h*w, the config, default logit 0/1) and
    then the noise, both from one generator seeded with the run's seed."""
    config = tiny_pipe.scheduler.config
    latents = torch.zeros(2, 8, 1, 4, 6)
    noise, sigmas = objective.NoiseSampler(7, kind, config).draw(latents)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(sigmas, objective.sample_sigmas(kind, 2, 24, config, g, 0.0, 1.0))
    assert torch.equal(noise, torch.randn(latents.shape, generator=g))
    _, wide = objective.NoiseSampler(7, kind, config, logit_mean=1.0, logit_std=0.5).draw(latents)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(wide, objective.sample_sigmas(kind, 2, 24, config, g, 1.0, 0.5))


def test_loss_weights():
    s = torch.tensor([0.25, 0.5, 0.75])
    assert torch.equal(objective.loss_weights("none", s), torch.ones(3))
    torch.testing.assert_close(objective.loss_weights("sigma_sqrt", s), torch.tensor([16.0, 4.0, 16 / 9]))
    cosmap = objective.loss_weights("cosmap", s)
    assert cosmap[1] == cosmap.max() and torch.isclose(cosmap[0], cosmap[2])
    for kind in ("sigma_sqrt", "cosmap"):  # SD3's weights, as diffusers' example scripts compute them
        torch.testing.assert_close(objective.loss_weights(kind, s), compute_loss_weighting_for_sd3(kind, s))
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


# ----------------------------------------------------------------------------- known answers from the scheduler


class _Oracle:
    """Stands in for the transformer (`predict_velocity` needs only a callable with a dtype): returns `velocity`
    on the target tokens and records what it was called with."""

    dtype = torch.float32

    def __init__(self, velocity: torch.Tensor):
        self.velocity, self.calls = velocity, []

    def __call__(self, hidden_states, timestep, return_dict=False, **kwargs):
        self.calls.append({"hidden_states": hidden_states, "timestep": timestep})
        out = torch.zeros_like(hidden_states)
        out[:, -self.velocity.shape[3] * self.velocity.shape[4] :] = qmodel.pack(self.velocity)
        return (out,)


def _grid(tiny_model_dir) -> FlowMatchEulerDiscreteScheduler:
    """The tiny checkpoint's scheduler on a fresh 4-step grid, shifted as the pipeline shifts it."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.8)
    return scheduler


@pytest.fixture
def line(tiny_model_dir):
    """x0, noise and two samples at different grid points (steps 1 and 2), with an edit reference image."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 8, 1, 4, 4, generator=g), torch.randn(2, 8, 1, 4, 4, generator=g)
    cond = torch.randn(2, 8, 1, 2, 2, generator=g)
    prompt = qmodel.PromptEmbeds(torch.zeros(2, 3, 8), None, torch.zeros(2, 3, dtype=torch.bool))
    scheduler = _grid(tiny_model_dir)
    steps = torch.tensor([1, 2])
    return {
        "batch": _Batch(x0, prompt, [cond]),
        "x0": x0,
        "noise": noise,
        "cond": cond,
        "scheduler": scheduler,
        "timesteps": scheduler.timesteps[steps],
        "sigmas": scheduler.sigmas[steps].float(),
        "steps": steps,
    }


def _objective_target(line) -> torch.Tensor:
    """The prediction that minimises our loss: the loss is quadratic in the prediction p, so its gradient is
    2c(p - T) and T = -grad(0) / (grad(1) - grad(0)), whatever the normalisation c."""
    grads = []
    for fill in (0.0, 1.0):
        pred = torch.full_like(line["x0"], fill, requires_grad=True)
        objective.flow_matching_loss(_Oracle(pred), line["batch"], line["noise"], line["sigmas"]).backward()
        grads.append(pred.grad)
    return -grads[0] / (grads[1] - grads[0])


def test_noised_input_is_the_schedulers_scale_noise_and_timestep_is_sigma(line):
    oracle = _Oracle(torch.zeros_like(line["x0"]))
    objective.flow_matching_loss(oracle, line["batch"], line["noise"], line["sigmas"])
    (call,) = oracle.calls
    noisy = qmodel.unpack(call["hidden_states"][:, -16:], 4, 4)
    expected = line["scheduler"].scale_noise(line["x0"], line["timesteps"], line["noise"])
    torch.testing.assert_close(noisy, expected)
    # The reference image enters clean, ahead of the target tokens.
    torch.testing.assert_close(call["hidden_states"][:, :-16], qmodel.pack(line["cond"]))
    # The pipeline passes the scheduler's timestep / 1000 (test below), which is the sigma of scale_noise.
    torch.testing.assert_close(call["timestep"], line["timesteps"] / 1000)


def test_a_perfect_velocity_gives_zero_loss_and_the_opposite_does_not(line):
    sch, x0, noise = line["scheduler"], line["x0"], line["noise"]
    # The velocity of the scheduler's own line: the slope of scale_noise between two grid points.
    ends = [sch.scale_noise(x0, sch.timesteps[[i, i]], noise) for i in (0, 3)]
    velocity = (ends[1] - ends[0]) / (sch.sigmas[3] - sch.sigmas[0])
    mask = torch.ones(2, 1, 1, 4, 4)
    mask[:, :, :, :2] = 0.0
    for weighting in ("none", "sigma_sqrt"):
        perfect = objective.flow_matching_loss(_Oracle(velocity), line["batch"], noise, line["sigmas"], weighting)
        assert perfect.item() < 1e-10, weighting
    line["batch"].loss_mask = mask
    assert objective.flow_matching_loss(_Oracle(velocity), line["batch"], noise, line["sigmas"]).item() < 1e-10
    flipped = objective.flow_matching_loss(_Oracle(-velocity), line["batch"], noise, line["sigmas"]).item()
    assert flipped > 1.0


def test_an_euler_step_with_the_objectives_target_lands_on_the_next_point(tiny_model_dir, line):
    target = _objective_target(line)
    x0, noise = line["x0"], line["noise"]
    for b, i in enumerate(line["steps"].tolist()):
        sch = _grid(tiny_model_dir)  # a fresh step index per sample
        x_t = sch.scale_noise(x0[b : b + 1], sch.timesteps[[i]], noise[b : b + 1])
        stepped = sch.step(target[b : b + 1], sch.timesteps[i], x_t).prev_sample
        expected = sch.scale_noise(x0[b : b + 1], sch.timesteps[[i + 1]], noise[b : b + 1])
        torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)


def test_pipeline_passes_timestep_over_1000_which_is_the_sigma(tiny_pipe):
    seen = []
    handle = tiny_pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    try:
        Generator(tiny_pipe, resolution=64).generate(
            GenerationRequest("a mug", width=64, height=64, num_inference_steps=3)
        )
    finally:
        handle.remove()
    sch = tiny_pipe.scheduler
    assert len(seen) == 3
    for i, t in enumerate(seen):
        torch.testing.assert_close(t, (sch.timesteps[i] / 1000).expand_as(t))
        torch.testing.assert_close(t, sch.sigmas[i].expand_as(t).float())


def test_the_loss_is_each_samples_mask_weighted_mean_error_then_the_sigma_weighted_batch_mean(line):
    """Errors placed by hand around the objective's own target: a mask keeps only its region, in proportion to its
    weights, per sample; the loss weighting then scales each sample (diffusers' SD3 weights) before the batch mean."""
    target, sigmas = _objective_target(line), line["sigmas"]
    assert sigmas[0] != sigmas[1]  # so a weighting applied to the batch mean instead would show
    delta = torch.zeros_like(target)
    delta[0] = 1.0
    delta[0, :, :, :, :2] = 3.0  # squared error 9 where sample 0's mask is 0, and 1 where it keeps (weight 2)
    delta[1, :, :, 3, 3] = 2.0  # sample 1: squared error 4 on its one kept latent, 0 elsewhere; its weight is
    # small (an almost transparent image), so the weights sum below 1 and still give the weighted mean
    mask = torch.zeros(2, 1, 1, 4, 4, dtype=torch.float64)
    mask[0, :, :, :, 2:] = 2.0
    mask[1, :, :, 3, 3] = 0.05
    line["batch"].loss_mask = mask
    per_sample = torch.tensor([1.0, 4.0])
    for weighting in ("none", "sigma_sqrt", "cosmap"):
        loss = objective.flow_matching_loss(_Oracle(target + delta), line["batch"], line["noise"], sigmas, weighting)
        assert loss.dtype == torch.float32
        expected = (compute_loss_weighting_for_sd3(weighting, sigmas) * per_sample).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=weighting)
    mask[1] = 0.0  # nothing of sample 1 kept: it adds 0, not NaN
    loss = objective.flow_matching_loss(_Oracle(target + delta), line["batch"], line["noise"], sigmas)
    torch.testing.assert_close(loss, torch.tensor(0.5))
    # No mask: the plain per-sample mean (sample 0: half 9, half 1), weighted per sample.
    line["batch"].loss_mask = None
    delta[1] = 2.0
    loss = objective.flow_matching_loss(_Oracle(target + delta), line["batch"], line["noise"], sigmas, "cosmap")
    torch.testing.assert_close(
        loss, (compute_loss_weighting_for_sd3("cosmap", sigmas) * torch.tensor([5.0, 4.0])).mean()
    )


def test_the_given_dtype_reaches_the_transformer_for_a_wrapped_module_without_one(line):
    """The trainer passes the base model's dtype, because a DDP-wrapped transformer has no `.dtype`."""
    oracle = _Oracle(torch.zeros_like(line["x0"]))
    objective.flow_matching_loss(oracle, line["batch"], line["noise"], line["sigmas"], dtype=torch.float64)
    assert (
        oracle.calls[0]["hidden_states"].dtype == torch.float64 and oracle.calls[0]["timestep"].dtype == torch.float64
    )
