"""The one adapter-format component: ComfyUI's view of our export (its key map re-implemented from its source),
the fused MLP factors, and paths that are neither a local file nor a hub id."""

import os
import subprocess
import sys

import pytest
import torch

from qwen_image_lora import adapter_format
from qwen_image_lora.adapter_format import AdapterError, AdapterWeights, check_source, fuse_mlp_halves, to_comfyui
from qwen_image_lora.inference.testing import make_random_lora

MLP = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")


def linear_shapes(transformer) -> dict[str, tuple[int, int]]:
    """diffusers module name -> (out, in) of every Linear, seen through any peft wrapper."""
    return {
        name.removesuffix(".base_layer"): (m.out_features, m.in_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and ".lora_" not in name
    }


def comfyui_weight_shapes(transformer) -> dict[str, tuple[int, int]]:
    """The weights of ComfyUI's Qwen-Image-2.1 model: diffusers' module names, except that each block's SwiGLU
    `img_mlp.gate_layer` and `img_mlp.proj` are one `img_mlp.gate_up` linear (gate rows first)."""
    shapes = {}
    for name, (out, inp) in linear_shapes(transformer).items():
        fused = name.replace("img_mlp.gate_layer", "img_mlp.gate_up").replace("img_mlp.proj", "img_mlp.gate_up")
        rows = shapes.get(f"diffusion_model.{fused}.weight", (0, inp))[0]
        shapes[f"diffusion_model.{fused}.weight"] = (rows + out if fused != name else out, inp)
    return shapes


def comfyui_unloaded_keys(lora: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> list[str]:
    """Re-implements ComfyUI's LoRA loading for a Qwen-Image model (comfy/lora.py): the key map is the identity over
    the model's own weights (`diffusion_model.X.weight` is patched by `X`, `transformer.X`, `lycoris_X`, and the
    generic `diffusion_model.X` / `lora_unet_X` with dots as underscores); for each mapped name it takes
    `.lora_up.weight`, `.lora_down.weight` and `.alpha`. Returns the file's keys ComfyUI would warn it did not
    load, plus any patch whose lora_up @ lora_down does not have the weight's shape."""
    key_map = {}
    for weight in shapes:
        x = weight.removeprefix("diffusion_model.").removesuffix(".weight")
        for alias in (x, f"transformer.{x}", f"lycoris_{x.replace('.', '_')}", f"diffusion_model.{x}", f"lora_unet_{x.replace('.', '_')}"):
            key_map[alias] = weight
    loaded, problems = set(), []
    for alias, weight in key_map.items():
        up, down = f"{alias}.lora_up.weight", f"{alias}.lora_down.weight"
        if up in lora:
            loaded |= {up, down} | ({f"{alias}.alpha"} & set(lora))
            if (lora[up].shape[0], lora[down].shape[1]) != shapes[weight]:
                problems.append(f"{alias}: delta {(lora[up].shape[0], lora[down].shape[1])} vs weight {shapes[weight]}")
    return sorted(set(lora) - loaded) + problems


@pytest.mark.parametrize("targets", [MLP, "all-linear", ["img_mlp.proj"]])
def test_every_exported_key_loads_into_comfyuis_fused_model(transformer, tmp_path, targets):
    make_random_lora(transformer, tmp_path, rank=2, targets=targets)
    lora, _ = to_comfyui(adapter_format.read_adapter(tmp_path))
    assert any(".img_mlp.gate_up." in k for k in lora)
    assert comfyui_unloaded_keys(lora, comfyui_weight_shapes(transformer)) == []


def test_fused_mlp_factors_give_the_unfused_deltas_stacked_gate_rows_first():
    g = torch.Generator().manual_seed(0)
    a_gate, b_gate = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    a_proj, b_proj = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    down, up, scale = fuse_mlp_halves({"img_mlp.proj": (a_proj, b_proj, 0.5), "img_mlp.gate_layer": (a_gate, b_gate, 0.5)})
    assert down.shape == (8, 16) and up.shape == (48, 8) and scale == 0.5  # rank 2r
    expected = torch.cat([0.5 * b_gate @ a_gate, 0.5 * b_proj @ a_proj])  # ComfyUI's gate_up: gate rows, then proj
    torch.testing.assert_close(scale * up @ down, expected)
    # Halves at different scales (alpha_pattern) keep their own scale; a missing half adds zero rows.
    down, up, scale = fuse_mlp_halves({"img_mlp.gate_layer": (a_gate, b_gate, 0.5), "img_mlp.proj": (a_proj, b_proj, 2.0)})
    torch.testing.assert_close(scale * up @ down, torch.cat([0.5 * b_gate @ a_gate, 2.0 * b_proj @ a_proj]))
    down, up, scale = fuse_mlp_halves({"img_mlp.proj": (a_proj, b_proj, 1.0)})
    torch.testing.assert_close(scale * up @ down, torch.cat([torch.zeros(24, 16), b_proj @ a_proj]))


def test_reading_the_fused_export_back_splits_it_exactly(transformer, tmp_path):
    make_random_lora(transformer, tmp_path, rank=2, alpha=3, targets=MLP)
    ours = adapter_format.read_adapter(tmp_path, transformer)
    comfy = adapter_format.export_adapter(tmp_path)
    back = adapter_format.read_adapter(comfy, transformer)
    assert back.layout == "comfyui" and ours.layout == "diffusers"
    for key in ours.state_dict:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = key.replace("lora_A", "lora_B")
            delta = adapter_format.module_scale(ours.config, module, 2) * ours.state_dict[b] @ ours.state_dict[key]
            torch.testing.assert_close(back.state_dict[b] @ back.state_dict[key], delta, rtol=1e-5, atol=1e-6)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(AdapterError, match=r"outputs/nope: no such adapter.*outputs/ exists here"):
        check_source("outputs/nope")
    with pytest.raises(AdapterError, match=r"\./nope: no such adapter"):
        check_source("./nope")
    check_source("someone/their-lora")  # no folder `someone` here: a hub id, fetched when loaded
    check_source("outputs")


def test_generate_with_a_mistyped_lora_path_fails_before_loading_the_model(tmp_path):
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    # The model is a hub id that cannot be fetched offline: had it been loaded first, the error would be about it.
    cmd = [sys.executable, "-m", "qwen_image_lora.cli", "generate", "--model", "Qwen/Qwen-Image-2.1", "--lora", "outputs/nope",
           "--prompt", "a bottle", "--output", "out.png"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "outputs/nope: no such adapter file or folder" in result.stderr
    assert "Qwen/Qwen-Image-2.1" not in result.stderr and not (tmp_path / "out.png").exists()


def test_dora_weights_pass_through_unconverted(transformer, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], use_dora=True), adapter_name="d")
    try:
        state = get_peft_model_state_dict(transformer, adapter_name="d")
    finally:
        transformer.delete_adapters("d")
    adapter_format.write_diffusers(tmp_path, state, {"r": 2, "lora_alpha": 2, "use_dora": True, "target_modules": ["to_q"]})
    weights = adapter_format.read_adapter(tmp_path, transformer)
    assert isinstance(weights, AdapterWeights) and weights.config["use_dora"]
    assert {k.removeprefix("transformer.") for k in weights.state_dict} == set(state)
    assert all(torch.equal(weights.state_dict[f"transformer.{k}"], v) for k, v in state.items())


def test_the_comfyui_file_carries_kohyas_rank_and_alpha_header_and_alphas(transformer, tmp_path):
    """Tools that read kohya-style files take the network's rank and alpha from the header; ComfyUI scales each
    module by its `.alpha` tensor / rank. Both must say the adapter's own scale (alpha / rank = 2 here)."""
    from safetensors import safe_open

    make_random_lora(transformer, tmp_path / "src", rank=4, alpha=8.0, targets="all-linear")
    written = adapter_format.write_comfyui(tmp_path / "src", tmp_path / "out" / "lora.safetensors")
    with safe_open(str(written), "pt") as f:
        header = f.metadata()
        ranks = {k.removesuffix(".lora_down.weight"): f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")}
        alphas = {k.removesuffix(".alpha"): f.get_tensor(k) for k in f.keys() if k.endswith(".alpha")}
    assert header["format"] == "pt" and header["ss_network_dim"] == "4" and float(header["ss_network_alpha"]) == 8.0
    assert alphas.keys() == ranks.keys() and 8 in ranks.values()  # the fused gate_up holds both halves' ranks
    assert all(a.dtype == torch.float32 and a.item() / ranks[m] == 2.0 for m, a in alphas.items())
