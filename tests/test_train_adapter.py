"""The adapter: peft LoRA on the transformer only, saved in the diffusers format that plain
`QwenImage21Pipeline.load_lora_weights` loads, exported to the ComfyUI layout that loads back identically, and
initialised from an adapter file in any layout."""

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel
from safetensors import safe_open

from qwen_image_lora import adapter_format
from qwen_image_lora import model as qmodel
from qwen_image_lora.cli import main
from qwen_image_lora.config import LoRAConfig
from qwen_image_lora.errors import AdapterError
from qwen_image_lora.inference.adapters import Adapters
from qwen_image_lora.train import adapter


@pytest.fixture
def transformer(tiny_model_dir):

    return QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")


def _randomise(transformer, seed=0):
    """Give lora_B non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _velocity(transformer, tiny_pipe):
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, transformer.config.in_channels, 1, 4, 4, generator=g)
    prompt = qmodel.encode_prompt(tiny_pipe, ["a qwnbrand bottle"])
    with torch.no_grad():
        return qmodel.predict_velocity(transformer, noisy, prompt, torch.tensor([0.7]))


def test_only_targets_train_in_fp32_over_a_frozen_bf16_base(tiny_model_dir):

    t = QwenImage21Transformer2DModel.from_pretrained(
        tiny_model_dir, subfolder="transformer", torch_dtype=torch.bfloat16
    )
    params = adapter.add_lora(t, LoRAConfig(rank=4, alpha=4, targets=["to_q", "to_v"]))
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert trainable and all(".to_q.lora_" in n or ".to_v.lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.bfloat16 for n, p in t.named_parameters() if "lora_" not in n)
    assert all(torch.all(v == 0) for k, v in adapter.get_lora_state(t).items() if "lora_B" in k)  # default init


def test_unknown_target_is_a_clear_error(transformer):
    with pytest.raises(AdapterError, match="lora.targets"):
        adapter.add_lora(transformer, LoRAConfig(rank=4, alpha=4, targets=["no_such_layer"]))
    # One mistyped name among good ones: peft would silently train the others alone.
    with pytest.raises(AdapterError, match=r"^lora.targets: 'to_qq' matches no layer of the transformer \(e.g. 'to_q'"):
        adapter.add_lora(transformer, LoRAConfig(rank=4, alpha=4, targets=["to_qq", "to_v"]))
    assert not any("lora_" in n for n, _ in transformer.named_parameters())  # refused before any layer was wrapped


def test_saved_adapter_loads_with_plain_diffusers_and_changes_the_output(
    transformer, tiny_pipe, tiny_model_dir, tmp_path
):

    adapter.add_lora(transformer, LoRAConfig(rank=4, alpha=8, targets="attention+mlp"))
    _randomise(transformer)
    file = adapter.save_adapter(transformer, tmp_path)
    with safe_open(str(file), framework="pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8

    pipe = QwenImage21Pipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a qwnbrand bottle", width=64, height=64, num_inference_steps=2, output_type="np")
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path))
    tuned = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(tuned - base).mean() > 1e-3
    # The loaded adapter is ours exactly: same velocity as the in-memory adapter.
    torch.testing.assert_close(_velocity(pipe.transformer, tiny_pipe), _velocity(transformer, tiny_pipe))


@pytest.mark.parametrize("targets,rslora", [("attention", False), ("attention", True), ("attention+mlp", False)])
def test_comfyui_export_loads_back_to_the_same_outputs(
    transformer, tiny_pipe, tiny_model_dir, tmp_path, targets, rslora
):

    adapter.add_lora(transformer, LoRAConfig(rank=4, alpha=6, targets=targets, use_rslora=rslora))
    _randomise(transformer, seed=1)
    adapter.save_adapter(transformer, tmp_path)
    comfy = adapter_format.export_adapter(tmp_path, "comfyui", model=str(tiny_model_dir))
    with safe_open(str(comfy), framework="pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in keys} == {
        "lora_down",
        "lora_up",
        "alpha",
    }

    pipe = QwenImage21Pipeline.from_pretrained(tiny_model_dir)
    loaded = Adapters(pipe)
    loaded.set({loaded.load(comfy): 1.0})
    torch.testing.assert_close(
        _velocity(pipe.transformer, tiny_pipe), _velocity(transformer, tiny_pipe), rtol=1e-4, atol=1e-5
    )


def test_rslora_export_header_alpha_agrees_with_every_module_alpha(transformer, tmp_path, tiny_model_dir):
    adapter.add_lora(transformer, LoRAConfig(rank=4, alpha=16, targets="attention+mlp", use_rslora=True))
    adapter.save_adapter(transformer, tmp_path)
    with safe_open(str(adapter_format.export_adapter(tmp_path, model=str(tiny_model_dir))), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header_scale = float(header["ss_network_alpha"]) / int(header["ss_network_dim"])
    assert header_scale == pytest.approx(16 / 2)  # rsLoRA: alpha / sqrt(rank)
    for key, alpha in tensors.items():
        if key.endswith(".alpha"):
            rank = tensors[key.replace(".alpha", ".lora_down.weight")].shape[0]
            assert alpha.item() / rank == pytest.approx(header_scale), key


def test_export_cli(transformer, tmp_path, capsys, tiny_model_dir):

    adapter.add_lora(transformer, LoRAConfig(rank=2, alpha=2))
    adapter.save_adapter(transformer, tmp_path)
    assert main(["export", "--format", "comfyui", str(tmp_path), "--model", str(tiny_model_dir)]) == 0
    assert (tmp_path / adapter_format.COMFYUI_NAME).is_file()
    assert main(["export", str(tmp_path / "missing")]) == 2


def test_dora_cannot_be_exported_to_comfyui_and_the_refusal_says_why(transformer, tmp_path, tiny_model_dir):
    adapter.add_lora(transformer, LoRAConfig(rank=2, alpha=2, use_dora=True))
    adapter.save_adapter(transformer, tmp_path)
    with pytest.raises(AdapterError, match=r"DoRA.*weight_decompose.*base weight"):
        adapter_format.export_adapter(tmp_path, model=str(tiny_model_dir))
    assert not (tmp_path / adapter_format.COMFYUI_NAME).exists()


def test_init_from_an_existing_adapter(transformer, tiny_model_dir, tmp_path):

    adapter.add_lora(transformer, LoRAConfig(rank=4, alpha=4))
    _randomise(transformer, seed=2)
    adapter.save_adapter(transformer, tmp_path)
    other = QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    adapter.add_lora(other, LoRAConfig(rank=4, alpha=4, init_from=str(tmp_path)))
    a, b = adapter.get_lora_state(transformer), adapter.get_lora_state(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A layout mismatch is an error naming what differs, not a silent partial load.
    third = QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    with pytest.raises(AdapterError, match=rf"^lora.init_from {tmp_path}: adapter weight .* \(does lora.rank match"):
        adapter.add_lora(third, LoRAConfig(rank=8, alpha=8, init_from=str(tmp_path)))  # it named neither


def test_init_from_a_comfyui_file_keeps_each_modules_delta_whatever_the_new_alpha(
    transformer, tiny_pipe, tiny_model_dir, tmp_path
):

    adapter.add_lora(transformer, LoRAConfig(rank=4, alpha=4, targets="attention"))
    _randomise(transformer, seed=3)
    adapter.save_adapter(transformer, tmp_path)
    comfy = adapter_format.export_adapter(tmp_path, model=str(tiny_model_dir))  # alpha folded on reading: scale 1
    other = QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    adapter.add_lora(other, LoRAConfig(rank=4, alpha=32, targets="attention", init_from=str(comfy)))  # scale 8
    torch.testing.assert_close(_velocity(other, tiny_pipe), _velocity(transformer, tiny_pipe), rtol=1e-4, atol=1e-5)
