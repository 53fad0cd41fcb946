"""Every kind of adapter the recipe can train loads in our `Generator` and renders the training preview's pixels:
one short real training run per variant (tiny model, 2 steps), then the preview request through `generate`."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from qwen_image_lora.config import load_config
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.train.lora import LoRARecipe
from qwen_image_lora.train.validation import validation_requests

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
VARIANTS = {
    "lora-attention": [],
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true", "lora.alpha=16"],
    "attention+mlp": ["lora.targets=attention+mlp"],
    "all-linear": ["lora.targets=all-linear"],
    "custom-targets": ["lora.targets=[to_q, img_mlp.out]"],
}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """In-process recipes each build an Accelerator; accelerate keeps process-wide singletons."""

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    # The demo config's pixel budget (data.resolution: 128), as the training previews use it.
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=128)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trained_adapter_loads_in_generate_with_the_previews_pixels(
    variant, generator, tiny_model_dir, sample_data_dir, tmp_path
):
    out = tmp_path / variant
    cfg = load_config(DEMO, [
        f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", f"output_dir={out}",
        "train.max_steps=2", "train.batch_size=1", "optim.lr=1e-1", "checkpoint.every_steps=100",
        "validation.num_inference_steps=2", "validation.width=64", "validation.height=64", "validation.edits=[]",
        "validation.held_out_fraction=0", *VARIANTS[variant],
    ])  # fmt: skip
    recipe = LoRARecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    preview = np.asarray(Image.open(out / "samples" / "step_000002" / "t2i_00.png")).astype(np.int16)

    (request,) = validation_requests(cfg).values()
    name = generator.adapters.load(out)
    try:
        image = np.asarray(generator.generate(dataclasses.replace(request, adapters={name: 1.0}))).astype(np.int16)
        base = np.asarray(generator.generate(dataclasses.replace(request, adapters={}))).astype(np.int16)
    finally:
        generator.adapters.unload(name)
    assert np.array_equal(image, preview)
    assert np.abs(image - base).mean() > 0.1  # the adapter is applied (2 steps move the image a little), not skipped
