"""Fidelity with diffusers' own example script: on a fixed batch, noise and timesteps (fp32) our latents and our
flow-matching loss equal the ones its training step computes, and the tiny checkpoint trains with the script and
the adapter it writes loads through ours. The script accepts only the real VAE's geometry (four 2x downsamplings),
so these tests run on the tiny checkpoint built with `downsampling_vae=True`.

Skipped unless DIFFUSERS_EXAMPLE_SCRIPT points at a local copy of diffusers'
`examples/dreambooth/train_dreambooth_lora_qwenimage21.py` (it is not vendored here).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora import objective
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.tiny_model import make_tiny_model

SCRIPT = os.environ.get("DIFFUSERS_EXAMPLE_SCRIPT")

pytestmark = pytest.mark.skipif(
    not SCRIPT or not Path(SCRIPT).is_file(),
    reason="set DIFFUSERS_EXAMPLE_SCRIPT to a local copy of diffusers' train_dreambooth_lora_qwenimage21.py",
)

RANK, ALPHA = 4, 8  # alpha != rank, so a loader that drops the saved alpha shows up


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-downsampling-vae", downsampling_vae=True)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return qmodel.load_pipeline(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def example():
    """The example script imported as a module (its `main()` is not run)."""
    spec = importlib.util.spec_from_file_location("diffusers_example_qwenimage21", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main_statements(module, first: str, last: str) -> str:
    """The statements of the example's `main()` from the line starting with `first` through the one starting with
    `last`, dedented. Its training step is written inline in `main()`, not as a function, so the test runs those
    statements as read from the script at test time (nothing of it is copied here)."""
    lines = inspect.getsource(module.main).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
        end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(last))
    except StopIteration:
        pytest.fail(
            f"{SCRIPT}: main() has no line starting {first!r} followed by one starting {last!r}; "
            "the example changed, update the markers in this test"
        )
    return textwrap.dedent("\n".join(lines[start : end + 1]))


class _Batch:
    def __init__(self, latents, prompt):
        self.latents, self.prompt, self.cond_latents = latents, prompt, []


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_equals_the_example_training_step(example, pipe, model_dir, weighting, tmp_path):

    args = example.parse_args(
        [
            "--pretrained_model_name_or_path",
            str(model_dir),
            "--instance_data_dir",
            str(tmp_path),
            "--instance_prompt",
            "a qwnbrand bottle",
            "--weighting_scheme",
            weighting,
            "--mixed_precision",
            "no",
        ]
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    # The step's free names: the script's module globals plus main()'s locals it reads.
    ns = dict(vars(example))
    ns.update(
        args=args,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
        vae=pipe.vae,
        transformer=pipe.transformer,
        noise_scheduler_copy=scheduler,
        weight_dtype=torch.float32,
    )
    exec(_main_statements(example, "vae_scale_factor = 2 **", "latents_std = 1.0 /"), ns)
    exec(_main_statements(example, "def get_sigmas(", "return sigma"), ns)

    # A fixed batch of two images and two prompts of different lengths (so the prompt mask is not None).
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy()) for _ in range(2)]
    pixels = torch.cat([qmodel.image_to_pixels(pipe, im) for im in images])
    prompts = ["a qwnbrand bottle", "a red mug on a wooden table by the window"]

    # Latents: the example normalises the VAE posterior as it is written in main(); we take the same mode.
    with torch.no_grad():
        ns["model_input"] = pipe.vae.encode(pixels).latent_dist.mode()
    exec(_main_statements(example, "model_input = (model_input - latents_mean)", "model_input = model_input.to("), ns)
    x0 = qmodel.encode_latents(pipe, pixels)
    torch.testing.assert_close(x0, ns["model_input"], rtol=1e-5, atol=1e-6)

    per_prompt = [qmodel.encode_prompt(pipe, [p]) for p in prompts]
    embeds, mask = example.concat_prompt_embedding_batches(*[(p.embeds, p.mask) for p in per_prompt])
    noise = torch.randn(x0.shape, generator=rng)
    timesteps = scheduler.timesteps[torch.tensor([250, 700])]  # the example's (u * 1000).long() indexing
    ns.update(model_input=x0, noise=noise, timesteps=timesteps, bsz=2, prompt_embeds=embeds, prompt_embeds_mask=mask)
    with torch.no_grad():
        exec(_main_statements(example, "# Add noise according to flow matching", "loss = loss.mean()"), ns)
        ours = objective.flow_matching_loss(
            pipe.transformer, _Batch(x0, qmodel.pad_prompt_embeds(per_prompt)), noise, timesteps / 1000, weighting
        )
    assert ns["prompt_embeds_mask"] is not None
    torch.testing.assert_close(ours, ns["loss"].float(), rtol=1e-5, atol=1e-7)


def test_example_script_trains_tiny_model_and_adapter_loads(model_dir, sample_data_dir, tmp_path):

    # The example opens every file of --instance_data_dir as an image, so give it the PNGs without captions.
    images = tmp_path / "images"
    images.mkdir()
    for png in sorted((Path(sample_data_dir) / "brand").glob("*.png")):
        shutil.copy(png, images / png.name)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        SCRIPT,
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--instance_data_dir",
        str(images),
        "--instance_prompt",
        "a qwnbrand bottle",
        "--resolution",
        "64",
        "--train_batch_size",
        "2",
        "--rank",
        str(RANK),
        "--lora_alpha",
        str(ALPHA),
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--lr_warmup_steps",
        "0",
        "--seed",
        "0",
        "--mixed_precision",
        "no",
        "--report_to",
        "tensorboard",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    weights = out / "pytorch_lora_weights.safetensors"
    assert weights.is_file()

    # Ours and diffusers' own loader give the same transformer, and the adapter changes it.
    gen = Generator.from_pretrained(model_dir, dtype="float32", device="cpu", resolution=64)
    name = gen.adapters.load(out, name="example")
    assert gen.adapters.loaded[name].layout == "diffusers"
    reference = qmodel.load_pipeline(model_dir, torch.float32, "cpu")
    reference.load_lora_weights(str(out))

    torch.manual_seed(0)
    h = w = 4
    kwargs = {
        "hidden_states": torch.randn(1, h * w, gen.pipe.transformer.config.in_channels),
        "encoder_hidden_states": torch.randn(1, 7, gen.pipe.transformer.config.context_in_dim),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, h, w)]],
        "img_mask": torch.cat([torch.zeros(1, 7, dtype=torch.bool), torch.ones(1, h * w // 4, dtype=torch.bool)], 1),
        "return_dict": False,
    }
    with torch.no_grad():
        gen.adapters.set({name: 1.0})
        ours = gen.pipe.transformer(**kwargs)[0]
        theirs = reference.transformer(**kwargs)[0]
        gen.adapters.set({})
        base = gen.pipe.transformer(**kwargs)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - base).abs().max() > 1e-4

    image = gen.generate(
        GenerationRequest("a qwnbrand bottle", width=64, height=64, num_inference_steps=2, adapters={name: 1.0})
    )
    assert image.size == (64, 64)
