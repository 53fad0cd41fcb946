"""The model card's code runs as written: on the tiny model it loads every component in bfloat16 and the adapter."""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch
import yaml

from qwen_image_lora.config import DEFAULT_MODEL, load_config
from qwen_image_lora.train.export import model_card


def test_the_model_cards_snippet_loads_in_bfloat16_with_the_adapter(tiny_model_dir, make_adapter, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", 0.1)
    cfg = load_config(None, [f"model.pretrained={tiny_model_dir}", "data.trigger_word=qwnbrand"])
    card = model_card(cfg, {"steps": 10}, {})
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    *setup, call = snippet.strip().splitlines()
    assert call.startswith("image = pipe(") and "qwnbrand" in call  # generating is left out: 1024 px on CPU
    code = "\n".join(setup).replace('.to("cuda")', "").replace("path/to/this/folder", str(adapter))
    code = code.replace(f"path/to/{tiny_model_dir.name}", str(tiny_model_dir))  # a local base: named, not located
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own code, as a reader would paste it
    pipe = scope["pipe"]
    assert {pipe.transformer.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}
    assert len(pipe.get_list_adapters()["transformer"]) == 1


def test_the_model_card_names_local_paths_by_their_last_name_only(tmp_path):
    """A card pushed to the Hub carried this machine's absolute paths (/home/<user>/...) in its front matter, title,
    text and code; the EMA row read "None" and the final loss 3.461827337741852."""
    model, data = tmp_path / "home" / "alice" / "models" / "qwen-base", tmp_path / "home" / "alice" / "shoot-2026"
    cfg = load_config(None, [f"model.pretrained={model}", f"data.path={data}"])
    card = model_card(cfg, {"steps": 10, "final_loss": 3.461827337741852}, {})
    assert str(tmp_path) not in card and "alice" not in card
    assert "base_model:" not in card and "# LoRA for qwen-base" in card and "on `shoot-2026`" in card
    assert 'from_pretrained("path/to/qwen-base"' in card
    assert "| EMA | off |" in card and "| final loss (mean of last steps) | 3.4618 |" in card
    hub = model_card(load_config(None, [f"model.pretrained={DEFAULT_MODEL}"]), {"steps": 10}, {})
    assert f"base_model: {DEFAULT_MODEL}" in hub and f'from_pretrained("{DEFAULT_MODEL}"' in hub


@pytest.mark.parametrize("trigger", ["#qwnbrand", "[V]", "qwn: brand", 'say "hi"'])
def test_the_cards_front_matter_and_snippet_keep_any_trigger_word_as_text(trigger):
    """`instance_prompt: #qwnbrand` read back as None, `[V]` as a list, and `qwn: brand` failed to parse."""
    card = model_card(load_config(None, [f"data.trigger_word={json.dumps(trigger)}"]), {"steps": 10}, {})
    front = yaml.safe_load(card.split("---")[1])
    assert front["instance_prompt"] == trigger
    (call,) = [line for line in card.splitlines() if line.startswith("image = pipe(")]
    assert ast.literal_eval(call.removeprefix("image = pipe(").removesuffix(").images[0]")).startswith(trigger + " ")


def test_a_dora_runs_card_does_not_offer_the_comfyui_export_it_refuses():
    plain = model_card(load_config(None, []), {"steps": 10}, {})
    dora = model_card(load_config(None, ["lora.use_dora=true"]), {"steps": 10}, {})
    assert "qwen-lora export --format comfyui" in plain
    assert "qwen-lora export" not in dora and "DoRA adapters have no exact ComfyUI form" in dora
