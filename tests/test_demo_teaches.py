"""Does training teach anything? The demo's recipe, shortened, on the tiny model (whose VAE reconstructs the
images): the trained adapter's images are closer to the brand palette than the base model's at the same seeds,
with a paired 95% interval that excludes zero, as the eval report states it. A wrong sign or scale anywhere in
the objective teaches the adapter nothing (or the wrong thing) and fails this."""

import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from qwen_image_lora.config import load_config
from qwen_image_lora.eval.evaluator import evaluate
from qwen_image_lora.eval.summary import BETTER
from qwen_image_lora.train.lora import LoRARecipe

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The in-process recipe builds an Accelerator; accelerate keeps process-wide singletons."""

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_the_demo_adapter_moves_images_towards_the_brand_palette(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        DEMO,
        [
            f"model.pretrained={tiny_model_dir}",
            f"data.path={sample_data_dir / 'brand'}",  # the t2i half of the demo data: the palette is learnt from it
            f"output_dir={out}",
            "validation.every_steps=0",
            "validation.prompts=[]",
            "validation.edits=[]",
            "validation.held_out_fraction=0",
            "checkpoint.every_steps=1000",
            "eval.edits=[]",  # the demo's edit reads the demo's own sample folder
        ],
    )
    recipe = LoRARecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()

    _, report_json = evaluate(cfg, adapters=[out])
    report = json.loads(report_json.read_text())
    palette = report["metrics"]["palette_delta_e"]
    (adapter,) = palette["delta"]
    delta, base = palette["delta"][adapter], palette["variants"]["base"]
    assert delta["n"] == len(cfg.eval.seeds) * len(cfg.eval.prompts)
    # Closer to the palette (lower dE) than the base model at the same seeds: the whole interval below zero.
    assert delta["high"] < 0 and delta["mean"] < -0.02 * base["mean"], palette
    assert report["verdicts"][adapter]["metrics"]["palette_delta_e"]["verdict"] == BETTER  # what the user reads
