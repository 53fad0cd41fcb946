"""The model card's code runs as written: on the tiny model it loads every component in bfloat16 and the adapter."""

from __future__ import annotations

import re

import torch

from qwen_image_lora.config import load_config
from qwen_image_lora.train.export import model_card


def test_the_model_cards_snippet_loads_in_bfloat16_with_the_adapter(tiny_model_dir, make_adapter, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", 0.1)
    cfg = load_config(None, [f"model.pretrained={tiny_model_dir}", "data.trigger_word=qwnbrand"])
    card = model_card(cfg, {"steps": 10}, {})
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    *setup, call = snippet.strip().splitlines()
    assert call.startswith("image = pipe(") and "qwnbrand" in call  # generating is left out: 1024 px on CPU
    code = "\n".join(setup).replace('.to("cuda")', "").replace("path/to/this/folder", str(adapter))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own code, as a reader would paste it
    pipe = scope["pipe"]
    assert {pipe.transformer.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}
    assert len(pipe.get_list_adapters()["transformer"]) == 1
