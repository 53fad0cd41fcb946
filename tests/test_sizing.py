"""One sizing rule: a non-square edit trains at the size it is generated at, under the same pixel budget."""

import json

import numpy as np
import pytest
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions
from PIL import Image

from qwen_image_lora.config import load_config
from qwen_image_lora.data.dataset import plan_entries
from qwen_image_lora.data.sources import load_items
from qwen_image_lora.inference.generator import GenerationRequest, Generator


def test_a_non_square_edit_trains_and_generates_at_the_same_size(tiny_pipe, tmp_path):
    size, budget = (
        (300, 170),
        256,
    )  # near 1920x1080's aspect (the old bucket rule gave 320x192 here, generation 352x192)
    for name in ("src", "tgt"):
        Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"target": "tgt.png", "instruction": "x", "sources": ["src.png"]}) + "\n"
    )
    cfg = load_config(None, [f"data.path={tmp_path / 'm.jsonl'}", f"data.resolution={budget}", "data.max_upscale=4"])
    (entry,), _ = plan_entries(load_items(cfg.data), cfg)
    trained = entry.target.bucket
    assert entry.sources[0].bucket == trained

    gen = Generator(tiny_pipe, resolution=cfg.data.resolution)
    request = GenerationRequest("x", images=[Image.open(tmp_path / "src.png")], num_inference_steps=1)
    assert gen._size(request) == trained
    # ... and the pipeline resizes the condition image to that size too: the transformer gets its latent grid.
    shapes = []

    def grab(module, args, kwargs):
        shapes.append(kwargs["img_shapes"][0])

    hook = tiny_pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        gen.generate(request)
    finally:
        hook.remove()
    (_, h, w), target = shapes[0][0], shapes[0][-1]
    assert (w * 16, h * 16) == trained and (target[2] * 16, target[1] * 16) == trained


def test_inputs_the_pipeline_cannot_resize_are_refused_naming_the_image_and_the_limit(tiny_pipe):
    """The limit is the pipeline's own rule: `calculate_dimensions` gives a 0 px side from that aspect on."""

    gen = Generator(tiny_pipe, resolution=64)
    ok, too_wide = Image.new("RGB", (159, 10)), Image.new("RGB", (10, 160))  # aspects 15.9:1 and 16:1 at 64 px
    assert (
        min(calculate_dimensions(64 * 64, 159 / 10)[:2]) > 0 and min(calculate_dimensions(64 * 64, 10 / 160)[:2]) == 0
    )
    gen.check(GenerationRequest("x", images=[ok]))
    with pytest.raises(ValueError) as e:
        gen.check(GenerationRequest("x", images=[ok, too_wide]))  # the CLI and batch jobs go through `check` too
    assert str(e.value).startswith("images: image 2 is 10x160 (aspect 16.0:1)") and "under 16:1" in str(e.value), (
        e.value
    )
