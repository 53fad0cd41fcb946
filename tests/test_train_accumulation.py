"""Gradient accumulation in the recipe: an optimizer step over k micro-batches is the step a batch k times larger
takes (the same gradient, not k times it), and the step count, the LR schedule, the loss log and the sampler
cursor advance once per optimizer step, not once per micro-batch. AdamW's scale invariance and clipping hid a
gradient k times too large, and accelerate's optimizer wrapper hid a loop that counted micro-batches as steps."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from qwen_image_lora import objective
from qwen_image_lora.config import load_config
from qwen_image_lora.data.dataset import collate
from qwen_image_lora.train.lora import LoRARecipe

ROOT = Path(__file__).resolve().parents[1]
LR = 5e-3


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """In-process recipes each build an Accelerator; accelerate keeps process-wide singletons."""

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _two_items(sample_data_dir, root) -> Path:
    """Two brand items at one size, so the two micro-batches can also form one batch of two."""
    root.mkdir()
    for name in ("000", "001"):
        Image.open(sample_data_dir / "brand" / f"{name}.png").resize((128, 128)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text((sample_data_dir / "brand" / f"{name}.txt").read_text())
    return root


def _recipe(tiny_model_dir, data, out) -> LoRARecipe:
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.pretrained={tiny_model_dir}", f"data.path={data}", f"output_dir={out}", "validation.prompts=[]",
        "validation.edits=[]", "validation.held_out_fraction=0", "train.batch_size=1",
        "train.gradient_accumulation_steps=2", "train.max_steps=2", "checkpoint.every_steps=1", f"optim.lr={LR}",
        "optim.warmup_steps=2",
    ])  # fmt: skip
    recipe = LoRARecipe(cfg)
    recipe.setup()
    return recipe


def test_two_micro_batches_make_one_step_of_the_batch_of_two(tiny_model_dir, sample_data_dir, tmp_path):
    data = _two_items(sample_data_dir, tmp_path / "data")
    recipe = _recipe(tiny_model_dir, data, tmp_path / "run")
    recipe.train()
    recipe.cleanup()
    rows = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    # One row and one scheduler step per optimizer step: warm-up reaches the full rate after step 2, not micro-batch 2.
    # Each row holds the rate its step applied (it held the next step's: step 1 read LR/2 and trained at 0).
    assert [r["step"] for r in rows] == [1, 2] and recipe.lr_scheduler.last_epoch == 2
    assert [r["lr"] for r in rows] == pytest.approx([0, LR / 2])
    # The sampler cursor counts micro-batches: 2 per step (an epoch here is 2 batches of 1).
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "progress.json").read_text())
    assert (saved["epoch"], saved["position"]) == (0, 2) and recipe.cursor == (1, 2)

    # The same first step by hand, from a fresh recipe (same seed: same LoRA init, data order and noise stream):
    # the two micro-batches with the noise each drew, as the one batch of two that batch_size=2 would train on.
    fresh = _recipe(tiny_model_dir, data, tmp_path / "by-hand")
    keys = iter(fresh.data.sampler)
    samples = [fresh.data.dataset[key] for _ in range(2) for key in next(keys)]
    draws = [fresh.noise.draw(s["latents"]) for s in samples]  # micro-batch order: the stream the loop draws
    batch = collate(samples)
    noise, sigmas = torch.cat([n for n, _ in draws]), torch.cat([s for _, s in draws])
    fresh.transformer.train()
    objective.flow_matching_loss(fresh.transformer, batch, noise, sigmas, fresh.cfg.train.loss_weighting).backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in fresh.params]))
    fresh.cleanup()
    assert rows[0]["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)  # logged before clipping
