"""One sizing rule: a non-square edit trains at the size it is generated at, under the same pixel budget."""

import json

import numpy as np
from PIL import Image

from qwen_image_lora.config import load_config
from qwen_image_lora.data.dataset import plan_entries
from qwen_image_lora.data.sources import load_items
from qwen_image_lora.inference.generator import GenerationRequest, Generator


def test_a_non_square_edit_trains_and_generates_at_the_same_size(tiny_pipe, tmp_path):
    size, budget = (300, 170), 256  # near 1920x1080's aspect (the old bucket rule gave 320x192 here, generation 352x192)
    for name in ("src", "tgt"):
        Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"target": "tgt.png", "instruction": "x", "sources": ["src.png"]}) + "\n")
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
