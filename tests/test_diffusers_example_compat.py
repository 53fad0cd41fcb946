"""The tiny checkpoint trains with diffusers' own example script, and the adapter it writes loads through ours.

Skipped unless DIFFUSERS_EXAMPLE_SCRIPT points at a local copy of diffusers'
`examples/dreambooth/train_dreambooth_lora_qwenimage21.py` (it is not vendored here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = os.environ.get("DIFFUSERS_EXAMPLE_SCRIPT")

pytestmark = pytest.mark.skipif(
    not SCRIPT or not Path(SCRIPT).is_file(),
    reason="set DIFFUSERS_EXAMPLE_SCRIPT to a local copy of diffusers' train_dreambooth_lora_qwenimage21.py",
)

RANK, ALPHA = 4, 8  # alpha != rank, so a loader that drops the saved alpha shows up


def test_example_script_trains_tiny_model_and_adapter_loads(tiny_model_dir, sample_data_dir, tmp_path):
    from qwen_image_lora.inference.generator import GenerationRequest, Generator

    from qwen_image_lora import model as qmodel

    # The example opens every file of --instance_data_dir as an image, so give it the PNGs without captions.
    images = tmp_path / "images"
    images.mkdir()
    for png in sorted((Path(sample_data_dir) / "brand").glob("*.png")):
        shutil.copy(png, images / png.name)
    out = tmp_path / "out"
    cmd = [
        sys.executable, SCRIPT,
        "--pretrained_model_name_or_path", str(tiny_model_dir),
        "--instance_data_dir", str(images),
        "--instance_prompt", "a qwnbrand bottle",
        "--resolution", "64",
        "--train_batch_size", "2",
        "--rank", str(RANK),
        "--lora_alpha", str(ALPHA),
        "--max_train_steps", "2",
        "--learning_rate", "1e-2",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--mixed_precision", "no",
        "--report_to", "tensorboard",
        "--output_dir", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    weights = out / "pytorch_lora_weights.safetensors"
    assert weights.is_file()

    # Ours and diffusers' own loader give the same transformer, and the adapter changes it.
    gen = Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)
    name = gen.adapters.load(out, name="example")
    assert gen.adapters.loaded[name].layout == "diffusers"
    reference = qmodel.load_pipeline(tiny_model_dir, torch.float32, "cpu")
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
