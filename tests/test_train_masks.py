"""Edit pairs with a mask: the loss weighs the changed region (`train.mask_loss_weight`); bad masks are named."""

import json

import numpy as np
import torch
from PIL import Image

from qwen_image_lora.config import load_config
from qwen_image_lora.data.dataset import build_training_data
from qwen_image_lora.data.doctor import diagnose


def write_pair(folder, mask_size=(128, 64)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(folder / "src.png")
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(folder / "tgt.png")
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 64, 64))  # the left half changed
    mask.resize(mask_size).save(folder / "mask.png")
    row = {"target": "tgt.png", "instruction": "make it red", "sources": ["src.png"], "mask": "mask.png"}
    (folder / "m.jsonl").write_text(json.dumps(row) + "\n")


def data(tiny_pipe, folder, weight):
    cfg = load_config(
        None,
        [
            f"data.path={folder / 'm.jsonl'}",
            "data.resolution=128",
            "data.min_side=16",
            f"train.mask_loss_weight={weight}",
            f"output_dir={folder / 'out'}",
            "data.cache_dir=null",
        ],
    )
    return build_training_data(cfg, tiny_pipe)


def test_changed_latents_weigh_mask_loss_weight_and_kept_ones_one(tiny_pipe, tmp_path):
    write_pair(tmp_path)
    batch = next(iter(data(tiny_pipe, tmp_path, 4.0).loader()))
    weights = batch.loss_mask[0, 0, 0]
    w = weights.shape[1]
    assert torch.allclose(weights[:, : w // 2], torch.tensor(4.0)) and torch.allclose(
        weights[:, w // 2 :], torch.tensor(1.0)
    )
    assert next(iter(data(tiny_pipe, tmp_path, 1.0).loader())).loss_mask is None  # 1.0 = off


def test_a_mask_of_another_aspect_is_an_error_naming_it(tmp_path):
    write_pair(tmp_path, mask_size=(64, 64))
    cfg = load_config(
        None,
        [
            f"data.path={tmp_path / 'm.jsonl'}",
            "data.resolution=128",
            "data.min_side=16",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    report = diagnose(cfg, tokenizer=None, contact_sheet=False)
    found = [f for f in report.findings if f.code == "mask-size"]
    assert found and "mask.png is 64x64" in found[0].message
