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
    # ... and the pipeline resizes the condition image to that size too (the VAE encodes it at that size).
    shapes = []
    hook = tiny_pipe.vae.encoder.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        gen.generate(request)
    finally:
        hook.remove()
    assert shapes[0] == trained[::-1]
