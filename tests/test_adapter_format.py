"""The one adapter-format component: ComfyUI's view of our export (its key map re-implemented from its source),
the fused MLP factors, each module's scale as peft applies it, the layouts told apart and the files refused, and
paths that are neither a local file nor a hub id. Finding the file: tests/test_adapter_sources.py."""

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen_image_lora import adapter_format
from qwen_image_lora.adapter_checks import check_config, check_shapes
from qwen_image_lora.adapter_format import AdapterWeights, module_scale, read_adapter, to_comfyui
from qwen_image_lora.cli import main as cli_main
from qwen_image_lora.comfy_mlp import fuse_mlp_halves, split_fused_mlp
from qwen_image_lora.config import DEFAULT_MODEL, load_config, save_config
from qwen_image_lora.errors import AdapterError
from qwen_image_lora.hub import check_source, is_hub_id, local_weights_file
from qwen_image_lora.inference.testing import in_layout, make_random_lora

MLP = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):

    return QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")


@pytest.fixture
def export(tiny_model_dir):
    """`export_adapter` checking against the tiny model, the one these adapters are made for (a file from elsewhere
    is checked against the released model's architecture)."""
    return functools.partial(adapter_format.export_adapter, model=str(tiny_model_dir))


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
        for alias in (
            x,
            f"transformer.{x}",
            f"lycoris_{x.replace('.', '_')}",
            f"diffusion_model.{x}",
            f"lora_unet_{x.replace('.', '_')}",
        ):
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
    down, up, scale = fuse_mlp_halves(
        {"img_mlp.proj": (a_proj, b_proj, 0.5), "img_mlp.gate_layer": (a_gate, b_gate, 0.5)}
    )
    assert down.shape == (8, 16) and up.shape == (48, 8) and scale == 0.5  # rank 2r
    expected = torch.cat([0.5 * b_gate @ a_gate, 0.5 * b_proj @ a_proj])  # ComfyUI's gate_up: gate rows, then proj
    torch.testing.assert_close(scale * up @ down, expected)
    # Halves at different scales (alpha_pattern) keep their own scale; a missing half adds zero rows.
    down, up, scale = fuse_mlp_halves(
        {"img_mlp.gate_layer": (a_gate, b_gate, 0.5), "img_mlp.proj": (a_proj, b_proj, 2.0)}
    )
    torch.testing.assert_close(scale * up @ down, torch.cat([0.5 * b_gate @ a_gate, 2.0 * b_proj @ a_proj]))
    down, up, scale = fuse_mlp_halves({"img_mlp.proj": (a_proj, b_proj, 1.0)})
    torch.testing.assert_close(scale * up @ down, torch.cat([torch.zeros(24, 16), b_proj @ a_proj]))
    # A bf16 adapter stays bf16 (ComfyUI patches in the file's dtype; float32 factors would double the file).
    down, up, _ = fuse_mlp_halves(
        {h: (a_gate.bfloat16(), b_gate.bfloat16(), 1.0) for h in ("img_mlp.gate_layer", "img_mlp.proj")}
    )
    assert down.dtype == up.dtype == torch.bfloat16


def _full_prefix(export, source, out_file):
    """Our ComfyUI export under the whole model's prefix (`model.diffusion_model.`), as some ComfyUI tools save it."""
    save_file({f"model.{k}": v for k, v in load_file(str(export(source))).items()}, str(out_file))
    return out_file


@pytest.mark.parametrize(
    "layout",
    ["comfyui", "kohya", "ai-toolkit", "model.diffusion_model"],
)
def test_reading_the_fused_export_back_splits_it_exactly(transformer, tmp_path, layout, export):
    make_random_lora(transformer, tmp_path, rank=2, alpha=3, targets=MLP)
    ours = adapter_format.read_adapter(tmp_path, transformer)
    if layout == "comfyui":
        other = export(tmp_path)
    elif layout == "model.diffusion_model":
        other = _full_prefix(export, tmp_path, tmp_path / "full.safetensors")
    else:  # kohya's flattened names must unflatten to the fused gate_up, which is no module of diffusers' model
        other = in_layout(tmp_path, tmp_path / f"{layout}.safetensors", layout)
    back = adapter_format.read_adapter(other, transformer)
    assert back.layout == layout.replace("model.diffusion_model", "comfyui") and ours.layout == "diffusers"
    assert back.metadata is None  # diffusers folded each alpha / rank into the weights
    for key in ours.state_dict:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = key.replace("lora_A", "lora_B")
            delta = adapter_format.module_scale(ours.config, module, 2) * ours.state_dict[b] @ ours.state_dict[key]
            torch.testing.assert_close(back.state_dict[b] @ back.state_dict[key], delta, rtol=1e-5, atol=1e-6)
            # At its own rank, not the fused 2r: `lora.init_from` refused our export of an MLP adapter at any rank.
            assert back.state_dict[key].shape == ours.state_dict[key].shape


def test_a_fused_lora_that_is_not_block_diagonal_splits_exactly_at_its_rank():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(6, 16, generator=g), torch.randn(48, 6, generator=g)  # a fused LoRA trained in ComfyUI
    up[:, 5] = 0  # a column nothing uses, in both halves
    fused = "transformer.transformer_blocks.0.img_mlp.gate_up"
    split = split_fused_mlp({f"{fused}.lora_A.weight": down, f"{fused}.lora_B.weight": up})
    for i, half in enumerate(("gate_layer", "proj")):
        a, b = (split[f"transformer.transformer_blocks.0.img_mlp.{half}.lora_{x}.weight"] for x in "AB")
        assert a.shape == (5, 16) and b.shape == (24, 5)
        torch.testing.assert_close(b @ a, (up @ down)[i * 24 : (i + 1) * 24], rtol=0, atol=1e-5)
    bias = torch.arange(48.0)  # a LoRA with `lora_bias`: each half takes its rows of the fused up's bias
    split = split_fused_mlp(
        {f"{fused}.lora_A.weight": down, f"{fused}.lora_B.weight": up, f"{fused}.lora_B.bias": bias}
    )
    assert torch.equal(split["transformer.transformer_blocks.0.img_mlp.gate_layer.lora_B.bias"], bias[:24])
    assert torch.equal(split["transformer.transformer_blocks.0.img_mlp.proj.lora_B.bias"], bias[24:])
    up.zero_()  # untrained: each half keeps the whole rank (a rank-0 LoRA is no LoRA)
    split = split_fused_mlp({f"{fused}.lora_A.weight": down, f"{fused}.lora_B.weight": up})
    assert split["transformer.transformer_blocks.0.img_mlp.proj.lora_A.weight"].shape == (6, 16)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(AdapterError, match=r"outputs/nope: no such adapter.*outputs/ exists here"):
        check_source("outputs/nope")
    with pytest.raises(AdapterError, match=r"\./nope: no such adapter"):
        check_source("./nope")
    with pytest.raises(AdapterError, match=r"no such adapter file or folder \(and it is not a hub id") as absolute:
        check_source(str(tmp_path / "nope"))
    assert "/ exists here" not in str(absolute.value)  # the root: "(/ exists here, so it names a local path)"
    check_source("someone/their-lora")  # no folder `someone` here: a hub id, fetched when loaded
    check_source("outputs")
    # Neither a path here nor a hub id: a bare name, three parts without a .safetensors file, a dot-named folder.
    for source in ("nope.safetensors", "elsewhere/a/b", ".loras/style"):
        with pytest.raises(
            AdapterError, match=rf"^{re.escape(source)}: no such .*\(and it is not a hub id like owner/repo\)"
        ):
            check_source(source)
    assert is_hub_id("someone/their-lora/sub/style.safetensors") and not is_hub_id(".loras/style")


def test_generate_with_a_mistyped_lora_path_fails_before_loading_the_model(tmp_path):
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    # The model is a hub id that cannot be fetched offline: had it been loaded first, the error would be about it.
    cmd = [
        sys.executable,
        "-m",
        "qwen_image_lora.cli",
        "generate",
        "--model",
        "Qwen/Qwen-Image-2.1",
        "--lora",
        "outputs/nope",
        "--prompt",
        "a bottle",
        "--output",
        "out.png",
    ]
    result = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 2
    assert "outputs/nope: no such adapter file or folder" in result.stderr
    assert "Qwen/Qwen-Image-2.1" not in result.stderr and not (tmp_path / "out.png").exists()


def peft_adapter(transformer, config: dict, seed: int = 0):
    """A random LoRA as peft builds it from `config` (LoraConfig kwargs): its state dict, and per module the delta
    peft adds to the weight (its own get_delta_weight, scale included) and its scale."""

    transformer.add_adapter(LoraConfig(**config), adapter_name="p")
    try:
        g, deltas, scales = torch.Generator().manual_seed(seed), {}, {}
        for name, module in transformer.named_modules():
            if hasattr(module, "lora_B") and "p" in module.lora_B:
                with torch.no_grad():
                    for factor in (module.lora_A["p"].weight, module.lora_B["p"].weight):
                        factor.copy_(torch.randn(factor.shape, generator=g))
                deltas[name], scales[name] = module.get_delta_weight("p").detach().clone(), module.scaling["p"]
        return get_peft_model_state_dict(transformer, adapter_name="p"), deltas, scales
    finally:
        transformer.delete_adapters("p")


DORA = {"r": 2, "lora_alpha": 2, "use_dora": True, "target_modules": ["to_q"]}


def test_dora_weights_pass_through_unconverted(transformer, tmp_path):
    state, _, _ = peft_adapter(transformer, DORA)
    adapter_format.write_diffusers(tmp_path, state, DORA)
    weights = adapter_format.read_adapter(tmp_path, transformer)
    assert isinstance(weights, AdapterWeights) and weights.config["use_dora"]
    assert {k.removeprefix("transformer.") for k in weights.state_dict} == set(state)
    assert all(torch.equal(weights.state_dict[f"transformer.{k}"], v) for k, v in state.items())


def test_the_same_adapter_written_again_is_the_same_bytes_in_both_layouts(transformer, tmp_path, tiny_model_dir):
    """safetensors writes its metadata in a random order: a run's last checkpoint and its final adapter (the same
    weights) differed in their bytes half the time, so `--adapter RUN --adapter RUN/checkpoints/step-N` was scored
    twice where it should be refused, and an adapter saved again had "changed since the image was made"."""
    make_random_lora(transformer, tmp_path / "src", rank=4, alpha=8.0)
    state = {
        k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "src" / adapter_format.WEIGHTS_NAME).items()
    }
    with safe_open(str(tmp_path / "src" / adapter_format.WEIGHTS_NAME), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    written = [adapter_format.write_diffusers(tmp_path / f"d{i}", state, config).read_bytes() for i in range(8)]
    exported = [
        adapter_format.write_comfyui(tmp_path / "src", tmp_path / f"c{i}.safetensors", str(tiny_model_dir)).read_bytes()
        for i in range(8)
    ]
    assert len(set(written)) == len(set(exported)) == 1
    reread = load_file(tmp_path / "d0" / adapter_format.WEIGHTS_NAME)
    assert reread.keys() == {f"transformer.{k}" for k in state}
    assert all(torch.equal(reread[f"transformer.{k}"], v) for k, v in state.items())


@pytest.mark.parametrize("pad", range(8))
def test_a_header_is_put_in_key_order_whatever_its_padding_and_text(tmp_path, pad):
    """Every length of header (a header that fills its 8-byte boundary has no padding) and metadata past ASCII (a
    provenance path under /home/jürgen) come out the same bytes each time, and read back unchanged."""
    metadata = {"format": "pt", "source": "/home/jürgen/run" + "x" * pad, "ss_network_dim": "4"}
    written = set()
    for i in range(8):
        save_file({"a": torch.arange(4.0)}, str(tmp_path / f"{i}.safetensors"), metadata=metadata)
        written.add(adapter_format.canonical_header(tmp_path / f"{i}.safetensors").read_bytes())
    (data,) = written
    assert data[8:].startswith(b'{"__metadata__":{"format"') and load_file(tmp_path / "0.safetensors")["a"].sum() == 6
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == metadata


def test_the_comfyui_file_carries_kohyas_rank_and_alpha_header_and_alphas(transformer, tmp_path, tiny_model_dir):
    """Tools that read kohya-style files take the network's rank and alpha from the header; ComfyUI scales each
    module by its `.alpha` tensor / rank. Both must say the adapter's own scale (alpha / rank = 2 here)."""

    make_random_lora(transformer, tmp_path / "src", rank=4, alpha=8.0, targets="all-linear")
    written = adapter_format.write_comfyui(tmp_path / "src", tmp_path / "out" / "lora.safetensors", str(tiny_model_dir))
    with safe_open(str(written), "pt") as f:
        header = f.metadata()
        ranks = {
            k.removesuffix(".lora_down.weight"): f.get_tensor(k).shape[0]
            for k in f.keys()
            if k.endswith("lora_down.weight")
        }
        alphas = {k.removesuffix(".alpha"): f.get_tensor(k) for k in f.keys() if k.endswith(".alpha")}
    assert header["format"] == "pt" and header["ss_network_dim"] == "4" and float(header["ss_network_alpha"]) == 8.0
    assert alphas.keys() == ranks.keys() and 8 in ranks.values()  # the fused gate_up holds both halves' ranks
    assert all(a.dtype == torch.float32 and a.item() / ranks[m] == 2.0 for m, a in alphas.items())


# A full module name, a suffix, and ranks other than r: each module's scale is its own alpha over its own rank.
PATTERNS = {
    "r": 4,
    "lora_alpha": 8.0,
    "target_modules": MLP,
    "alpha_pattern": {"transformer_blocks.1.attn.to_q": 2.0, "img_mlp.proj": 12.0},
    "rank_pattern": {"transformer_blocks.0.attn.to_q": 2, "to_k": 8},
}


def comfyui_deltas(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's patch per module (comfy/weight_adapter/lora.py: alpha / rank * up @ down), each fused gate_up split
    back into diffusers' halves, gate rows first."""
    out = {}
    for key, down in lora.items():
        if key.endswith(".lora_down.weight"):
            x = key.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
            up, alpha = lora[f"diffusion_model.{x}.lora_up.weight"], lora[f"diffusion_model.{x}.alpha"].item()
            delta = alpha / down.shape[0] * up.float() @ down.float()
            if x.endswith(".img_mlp.gate_up"):
                out[x.replace("gate_up", "gate_layer")], out[x.replace("gate_up", "proj")] = delta.chunk(2)
            else:
                out[x] = delta
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_module_scale_is_the_factor_peft_applies(transformer, rslora):
    config = {**PATTERNS, "use_rslora": rslora}
    state, deltas, _ = peft_adapter(transformer, config)
    for module, delta in deltas.items():
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        torch.testing.assert_close(module_scale(config, module, a.shape[0]) * b @ a, delta)


@pytest.mark.parametrize("rslora", [False, True])
def test_comfyui_export_patches_each_module_with_pefts_delta_and_the_header_holds_the_default_scale(
    transformer, tmp_path, rslora
):
    config = {**PATTERNS, "use_rslora": rslora}
    state, deltas, scales = peft_adapter(transformer, config)
    adapter_format.write_diffusers(tmp_path, state, config)
    lora, header = to_comfyui(read_adapter(tmp_path, transformer))
    comfy = comfyui_deltas(lora)
    assert comfy.keys() == deltas.keys()
    for module, delta in deltas.items():
        torch.testing.assert_close(comfy[module], delta, rtol=1e-5, atol=1e-5)
    # kohya-reading tools scale every module by alpha / dim: the config's rank r and the scale of a module no pattern names.
    assert header["format"] == "pt" and int(header["ss_network_dim"]) == config["r"]
    assert float(header["ss_network_alpha"]) / config["r"] == pytest.approx(scales["transformer_blocks.0.attn.to_v"])


def test_a_folded_adapter_exports_at_scale_one_to_the_path_asked(transformer, tmp_path, export):
    """A file without a config (diffusers folded alpha / rank into its weights on reading) has scale 1 everywhere."""
    make_random_lora(transformer, tmp_path / "src", rank=4, alpha=8.0)  # attention only: one rank
    first = export(tmp_path / "src", "comfyui", tmp_path / "first.safetensors")
    assert first == tmp_path / "first.safetensors" and not (tmp_path / "src" / adapter_format.COMFYUI_NAME).exists()
    folded = read_adapter(first, transformer)
    assert folded.metadata is None and folded.config == {}
    lora, header = to_comfyui(folded)
    assert header["ss_network_dim"] == "4" and float(header["ss_network_alpha"]) == 4.0  # alpha = rank: scale 1
    again, before = comfyui_deltas(lora), comfyui_deltas(load_file(str(first)))
    assert again.keys() == before.keys()
    for module, delta in before.items():
        torch.testing.assert_close(again[module], delta)
    with pytest.raises(AdapterError, match=r"^export --format: unknown 'ckpt'; supported: comfyui$"):
        export(tmp_path / "src", "ckpt")


def test_export_never_replaces_the_adapter_it_reads_or_a_file_that_is_not_an_export(transformer, tmp_path, export):
    """It replaced the run's own adapter with the ComfyUI layout, overwrote any file named, crashed on a folder, and
    two files exported from one folder both went to comfyui_lora.safetensors."""
    make_random_lora(transformer, tmp_path / "run", rank=2)
    own = tmp_path / "run" / adapter_format.WEIGHTS_NAME
    (tmp_path / "notes.safetensors").write_text("mine")
    # someone's kohya/musubi LoRA: the same `ss_network_dim` header key an export has (it was replaced)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(tmp_path / "theirs.safetensors"),
              metadata={"ss_network_dim": "4", "ss_network_alpha": "4"})  # fmt: skip
    theirs = (tmp_path / "theirs.safetensors").read_bytes()
    before = own.read_bytes()
    shutil.copy(own, tmp_path / "copy.safetensors")
    for source, output, said in (
        (tmp_path / "run", own, "is the adapter's own file; choose another name"),
        (tmp_path / "copy.safetensors", own, "is the adapter's own file; choose another name"),  # a run's, not the source
        (tmp_path / "run", tmp_path / "notes.safetensors", "exists and is not a ComfyUI export; choose another name or "
                                                           "remove it (nothing was written)"),
        (tmp_path / "run", tmp_path / "theirs.safetensors", "exists and is not a ComfyUI export; choose another name "
                                                            "or remove it (nothing was written)"),
        (tmp_path / "run", tmp_path / "lora.pt", "is not a .safetensors file, which ComfyUI loads; name it "
                                                 "lora.safetensors, or give a folder"),
    ):  # fmt: skip
        with pytest.raises(AdapterError, match=rf"^export --output: {re.escape(str(output))} {re.escape(said)}$") as e:
            export(source, "comfyui", output)
        assert e.value.field == "--output"
    assert own.read_bytes() == before and (tmp_path / "notes.safetensors").read_text() == "mine"
    assert (tmp_path / "theirs.safetensors").read_bytes() == theirs
    # A folder that is not there yet, with a trailing slash or without an extension, is a folder: it was one file.
    for folder in (f"{tmp_path / 'exports'}/", tmp_path / "exports2"):
        written = export(tmp_path / "run", "comfyui", folder)
        assert written == Path(folder) / adapter_format.COMFYUI_NAME and written.is_file()
    into = export(tmp_path / "run", "comfyui", tmp_path / "run")  # a folder: the name in it
    assert into == tmp_path / "run" / adapter_format.COMFYUI_NAME
    assert export(own, "comfyui", into) == into  # a previous export is replaced, as asked
    shutil.copy(own, tmp_path / "a.safetensors")
    shutil.copy(own, tmp_path / "b.safetensors")
    named = [export(tmp_path / f"{n}.safetensors") for n in "ab"]
    assert [p.name for p in named] == ["a_comfyui.safetensors", "b_comfyui.safetensors"]


def test_an_export_into_a_checkpoint_folder_says_that_rotation_deletes_it(
    transformer, tmp_path, capsys, tiny_model_dir
):
    """`qwen-lora export out/run/checkpoints/step-000029` wrote there, and the next resume rotated the folder away
    with the export in it, without a word."""
    step = tmp_path / "run" / "checkpoints" / "step-000029"
    make_random_lora(transformer, step / "adapter", rank=2)
    assert cli_main(["export", str(step / "adapter"), "--model", str(tiny_model_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(step / "adapter" / adapter_format.COMFYUI_NAME)
    assert err.startswith(f"note: {out.strip()} lies in the checkpoint folder step-000029, which checkpoint rotation")
    assert (
        cli_main(
            [
                "export",
                str(step / "adapter"),
                "--model",
                str(tiny_model_dir),
                "--output",
                str(tmp_path / "kept.safetensors"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().err == ""


def test_dora_is_refused_for_comfyui_by_its_config_or_its_magnitudes_and_magnitudes_are_shape_checked(
    transformer, tmp_path
):
    state, _, _ = peft_adapter(transformer, DORA)
    adapter_format.write_diffusers(tmp_path, state, DORA)
    dora = read_adapter(tmp_path, transformer)
    plain = {k: v for k, v in dora.state_dict.items() if not k.endswith(".lora_magnitude_vector")}
    for weights in (dora, dataclasses.replace(dora, state_dict=plain), dataclasses.replace(dora, metadata=None)):
        with pytest.raises(AdapterError, match="DoRA adapters cannot be exported exactly"):
            to_comfyui(weights)
    key = "transformer.transformer_blocks.1.attn.to_q.lora_magnitude_vector"
    with pytest.raises(AdapterError, match=r"'transformer_blocks.1.attn.to_q': DoRA magnitude of 33, expected 32"):
        check_shapes({**dora.state_dict, key: torch.ones(33)}, transformer)


def test_the_shape_check_reports_every_misfit_three_in_full(transformer):
    a, b = torch.zeros(2, 32), torch.zeros(32, 2)
    state = {  # checked in sorted order: every kind of misfit must be reported, none may end the check
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a,  # half a pair: the config check's (below)
        "transformer.transformer_blocks.0.img_mlp.out.lora_A.weight": a,  # Linear(64 -> 32)
        "transformer.transformer_blocks.0.img_mlp.out.lora_B.weight": b,
        "transformer.transformer_blocks.0.img_norm1.lora_A.weight": a,
        "transformer.transformer_blocks.0.img_norm1.lora_B.weight": b,
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": a,
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": b,
    }
    shown = [
        "module 'transformer_blocks.0.img_mlp.out' is Linear(in=64, out=32) but the adapter has lora_A [2, 32] and "
        "lora_B [32, 2] (expected [2, 64] and [32, 2])",
        "module 'transformer_blocks.0.img_norm1' is LayerNorm, not a Linear layer",
        "module 'transformer_blocks.7.attn.to_q' does not exist in this transformer",
    ]
    intro = "adapter: does not fit this transformer — made for another model? "
    with pytest.raises(AdapterError) as error:
        check_shapes(state, transformer)
    assert str(error.value) == intro + "; ".join(shown)
    # A module that does not exist is one misfit among the others, not the end of the check.
    gone = {"transformer.transformer_blocks.0.attn.to_a.lora_A.weight": a, **state}
    with pytest.raises(AdapterError) as error:
        check_shapes(gone, transformer)
    assert (
        str(error.value)
        == intro
        + "; ".join(["module 'transformer_blocks.0.attn.to_a' does not exist in this transformer", *shown[:2]])
        + " (and 1 more)"
    )


def test_half_a_lora_pair_is_refused_naming_the_module(transformer, tmp_path):
    """A lora_B without its lora_A loaded with exit 0: peft kept its random lora_A there (a wrong image) and export
    dropped the module; a lora_A without its lora_B made export crash with a KeyError."""
    make_random_lora(transformer, tmp_path / "run", rank=2)
    full = load_file(str(tmp_path / "run" / adapter_format.WEIGHTS_NAME))
    for half in ("lora_A", "lora_B"):
        other = "lora_B" if half == "lora_A" else "lora_A"
        cut = {k: v for k, v in full.items() if k != f"transformer.transformer_blocks.0.attn.to_q.{other}.weight"}
        file = tmp_path / f"without_{other}.safetensors"
        save_file(cut, str(file))
        said = rf"^{re.escape(str(file))}: its weights do not match its own config: module 'transformer_blocks.0.attn.to_q': {half} without {other}"
        for read in (lambda: read_adapter(file, transformer), lambda: adapter_format.export_adapter(file)):
            with pytest.raises(AdapterError, match=said):
                read()
    # three misfits are all named, with no "(and 0 more)"; a fourth is counted
    halves = {
        f"transformer.transformer_blocks.0.attn.{m}.lora_A.weight": torch.zeros(2, 32) for m in ("to_k", "to_q", "to_v")
    }
    with pytest.raises(AdapterError) as three:
        check_config(halves, {})
    assert str(three.value).endswith(
        "module 'transformer_blocks.0.attn.to_v': lora_A without lora_B; save the weights and the config from one training run"
    )
    halves["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"] = torch.zeros(2, 32)
    with pytest.raises(AdapterError, match=r"to_v': lora_A without lora_B \(and 1 more\); save the weights"):
        check_config(halves, {})


def test_a_config_without_target_modules_targets_the_modules_its_weights_name(transformer, tmp_path):
    """`{"r": 2, "lora_alpha": 4}` as the file's metadata or adapter_config.json was peft's 30-line KeyError
    ('model_type'): peft guesses missing targets from a model type a diffusers transformer does not have."""
    make_random_lora(transformer, tmp_path / "run", rank=2, alpha=4.0)
    full = load_file(str(tmp_path / "run" / adapter_format.WEIGHTS_NAME))
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 4.0})}
    save_file(full, str(tmp_path / "meta.safetensors"), metadata=meta)
    (tmp_path / "peft").mkdir()
    save_file({k.replace("transformer.", "base_model.model.", 1): v for k, v in full.items()},
              str(tmp_path / "peft" / "adapter_model.safetensors"))  # fmt: skip
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4.0}))
    expected = read_adapter(tmp_path / "run", transformer)
    for source in (tmp_path / "meta.safetensors", tmp_path / "peft"):
        weights = read_adapter(source, transformer)
        transformer.load_lora_adapter(weights.state_dict, prefix="transformer", metadata=weights.metadata,
                                      adapter_name="bare")  # fmt: skip
        transformer.load_lora_adapter(expected.state_dict, prefix="transformer", metadata=expected.metadata,
                                      adapter_name="whole")  # fmt: skip
        try:
            adapted = [n for n, m in transformer.named_modules() if hasattr(m, "lora_B") and "bare" in m.lora_B]
            assert adapted and adapted == [
                n for n, m in transformer.named_modules() if hasattr(m, "lora_B") and "whole" in m.lora_B
            ]
            for name in adapted:
                module = transformer.get_submodule(name)
                torch.testing.assert_close(module.get_delta_weight("bare"), module.get_delta_weight("whole"))
        finally:
            transformer.delete_adapters(["bare", "whole"])


def test_a_peft_folder_reads_with_its_adapter_config_and_loads_into_diffusers_as_peft_had_it(
    transformer, tiny_model_dir, tmp_path, export
):
    config = {"r": 2, "lora_alpha": 6.0, "target_modules": ["img_mlp.proj", "to_q"], "use_rslora": True}
    # A fresh base: the module's transformer keeps earlier tests' (deleted) LoRA wrappers, which peft warns about.
    fresh = QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    wrapped = get_peft_model(fresh, LoraConfig(**config))
    deltas = {}
    for name, module in wrapped.base_model.model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight)
            deltas[name] = module.get_delta_weight("default").detach()
    wrapped.save_pretrained(tmp_path)  # adapter_model.safetensors (base_model.model. keys) + adapter_config.json
    weights = read_adapter(tmp_path, transformer)
    assert weights.layout == "peft" and weights.source == str(tmp_path / "adapter_model.safetensors")
    read = LoraConfig(**weights.config)
    assert (read.r, read.lora_alpha, read.use_rslora) == (config["r"], config["lora_alpha"], config["use_rslora"])
    assert read.target_modules == set(config["target_modules"])
    # diffusers' own loader, given the weights and the config read from the json, builds the adapter peft had.
    # Its ComfyUI export, written beside adapter_config.json, carries its alphas: the json scaled it again (3x here).
    exported = read_adapter(export(tmp_path), transformer)
    assert exported.layout == "comfyui" and exported.metadata is None
    for read_back, name in ((weights, "f"), (exported, "e")):
        transformer.load_lora_adapter(read_back.state_dict, prefix="transformer", metadata=read_back.metadata,
                                      adapter_name=name)  # fmt: skip
        try:
            for module, delta in deltas.items():
                torch.testing.assert_close(transformer.get_submodule(module).get_delta_weight(name), delta)
        finally:
            transformer.delete_adapters(name)


def test_bare_peft_keys_read_as_diffusers_layout(transformer):
    state, _, _ = peft_adapter(
        transformer, {"r": 2, "target_modules": ["to_q"]}
    )  # get_peft_model_state_dict: no prefix
    converted, layout = adapter_format.convert(state, None)
    assert layout == "diffusers" and converted.keys() == {f"transformer.{k}" for k in state}
    assert all(torch.equal(converted[f"transformer.{k}"], v) for k, v in state.items())
    with pytest.raises(AdapterError, match="^adapter: the file holds no tensors$"):  # a dict has no file name
        adapter_format.convert({}, None)


KOHYA_Q = "lora_unet_transformer_blocks_0_attn_to_q"
REFUSED = {  # case -> (tensors, read with the model?, why); every refusal names the file
    "empty": ({}, False, "the file holds no tensors"),
    "kohya without a model": (
        {f"{KOHYA_Q}.lora_down.weight": torch.zeros(2, 32)},
        False,
        r"a kohya-style \(lora_unet_\) adapter needs the model to unflatten its module names",
    ),
    "kohya, unknown part": (
        {f"{KOHYA_Q}.lora_mid.weight": torch.zeros(2, 2)},
        True,
        rf"unexpected key '{KOHYA_Q}.lora_mid.weight' in a kohya-style \(lora_unet_\) adapter",
    ),
    "kohya, another model": (
        {"lora_unet_transformer_blocks_9_attn_to_q.alpha": torch.tensor(2.0)},
        True,
        r"module 'transformer_blocks_9_attn_to_q' \(from '.*'\) does not exist in this transformer; "
        "the adapter was made for another model",
    ),
    "ComfyUI DoRA": (
        {"diffusion_model.transformer_blocks.0.attn.to_q.dora_scale": torch.ones(1, 32)},
        False,
        r"kohya/ComfyUI-style DoRA \(dora_scale\) normalises by another norm than peft's DoRA and cannot be "
        r"loaded exactly; use an adapter saved by diffusers/peft \(lora_magnitude_vector\)",
    ),
    "unknown part": (
        {"diffusion_model.transformer_blocks.0.attn.to_q.lora_mid.weight": torch.zeros(2, 2)},
        False,
        r"not a LoRA state dict diffusers can read \(.*lora_mid",
    ),
    "no lora_A": (
        {f"transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight": torch.zeros(32, 2) for i in range(4)},
        False,
        r"no LoRA weights found \(keys look like \['transformer.transformer_blocks.0.attn.to_q.lora_B.weight', "
        r"'transformer.transformer_blocks.1.attn.to_q.lora_B.weight', 'transformer.transformer_blocks.2.attn.to_q.lora_B.weight'\]\)",
    ),
    "lora_down alone": (
        {"diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(2, 32)},
        False,
        "not a LoRA state dict diffusers can read",
    ),
    "not finite": (
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.tensor([[0.0, float("nan")]]),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2),
        },
        False,
        r"'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' holds NaN or infinite values",
    ),
    "integer weights": (  # rendered a fully transparent black image, exit 0
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32, dtype=torch.int8),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2, dtype=torch.int8),
        },
        False,
        r"'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' holds int8 values; LoRA weights are floating",
    ),
    "float8 weights": (  # a traceback: torch has no isfinite for float8
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32).to(torch.float8_e4m3fn),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2),
        },
        False,
        r"'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' holds float8_e4m3fn values",
    ),
    "a float8 alpha": (  # the integer alphas kohya writes are read; this was isfinite's traceback
        {
            "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(2, 32),
            "diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(32, 2),
            "diffusion_model.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.0).to(torch.float8_e4m3fn),
        },
        False,
        r"'diffusion_model.transformer_blocks.0.attn.to_q.alpha' holds float8_e4m3fn values",
    ),
    "a vector for lora_A": (  # its length was read as the rank: "expected [128, 16] and [32, 128]"
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2),
        },
        False,
        r"its weights do not match its own config: module 'transformer_blocks.0.attn.to_q': lora_A is \[32\], not a",
    ),
    **{
        f"alpha {name}": (  # a negative alpha hung diffusers' folding (an endless loop); a huge one rendered black
            {
                "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(2, 32),
                "diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(32, 2),
                "diffusion_model.transformer_blocks.0.attn.to_q.alpha": alpha,
            },
            False,
            rf"'diffusion_model.transformer_blocks.0.attn.to_q.alpha' is {re.escape(str(alpha.tolist()))}; an alpha is "
            "one number above 0 and at most 10000",
        )
        for name, alpha in [
            ("-1", torch.tensor(-1.0)),
            ("0", torch.tensor(0)),
            ("1e30", torch.tensor(1e30)),
            ("of two numbers", torch.tensor([2.0, 2.0])),
        ]  # fmt: skip
    },
    "rank 0": (  # peft's "r should be a positive integer" traceback
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(0, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 0),
        },
        False,
        r"its weights do not match its own config: module 'transformer_blocks.0.attn.to_q': lora_A is \[0, 32\], not a "
        "matrix of rank 1 or more",
    ),
    "misfit": (
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 16),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2),
        },
        True,
        "does not fit this transformer",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_file_is_named_with_the_reason(transformer, tmp_path, case):
    tensors, with_model, why = REFUSED[case]
    file = tmp_path / "lora.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(file))}: {why}"), _within(60):
        read_adapter(file, transformer if with_model else None)


@contextlib.contextmanager
def _within(seconds: int):
    """Fail a read that does not return (a negative alpha sent diffusers' folding into an endless loop)."""

    def stuck(*_):
        raise TimeoutError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


BAD_CONFIGS = {  # the stored config's value -> what the refusal says; each was a traceback or a blank image
    "a list": ([1, 2], "its lora_adapter_metadata is not a JSON object"),
    "a string alpha": ({"lora_alpha": "8"}, "its config's lora_alpha is '8', not a number above 0 and at most 10000"),
    "a NaN alpha": ({"lora_alpha": float("nan")}, "its config's lora_alpha is nan"),
    "a huge alpha": ({"lora_alpha": 1e30}, "its config's lora_alpha is 1e+30"),
    "a string rank": ({"r": "4"}, "its config's r is '4', not a whole number above 0"),
    "a list rank_pattern": ({"rank_pattern": [1]}, "its config's rank_pattern is [1], not a mapping"),
    "a bad regex": ({"alpha_pattern": {"(": 3}}, "its config's alpha_pattern key '(' is not a regular expression"),
    "dropout 5": ({"lora_dropout": 5.0}, "its config's lora_dropout is 5.0, not a number from 0 to under 1"),
    "an unknown key": ({"bogus": 1}, "its config's bogus: not a peft LoraConfig setting"),
    "two unknown keys": ({"bogus": 1, "extra": 2}, "its config's bogus, extra: not peft LoraConfig settings"),
    "rank 0": ({"r": 0}, "its config's r is 0, not a whole number above 0"),
    "a fractional rank": ({"r": 2.5}, "its config's r is 2.5, not a whole number above 0"),
    "alpha 0": ({"lora_alpha": 0}, "its config's lora_alpha is 0, not a number above 0"),
    "alpha over the limit": ({"lora_alpha": 10_000.5}, "its config's lora_alpha is 10000.5, not a number above 0"),
    "dropout 1": ({"lora_dropout": 1.0}, "its config's lora_dropout is 1.0, not a number from 0 to under 1"),
    "a fractional rank_pattern": ({"rank_pattern": {"to_q": 2.5}}, "its config's rank_pattern['to_q'] is 2.5, not"),
    "a 0 in alpha_pattern": ({"alpha_pattern": {"to_q": 0}}, "its config's alpha_pattern['to_q'] is 0, not a number"),
}


def test_a_config_at_its_limits_reads(transformer, tmp_path):
    """The edges the checks keep: alpha 0.5 and 10000, dropout 0, alpha_pattern entries of 0.5 and 10000."""
    source = local_weights_file(make_random_lora(transformer, tmp_path / "src", rank=4, alpha=4.0))
    with safe_open(str(source), framework="pt") as f:
        tensors, stored = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_adapter_metadata"])
    for values in (
        {"lora_alpha": 0.5, "lora_dropout": 0.0},
        {"lora_alpha": 10_000, "alpha_pattern": {"to_q": 0.5, "to_k": 10_000}},
    ):
        value = {**stored, **{f"transformer.{k}": v for k, v in values.items()}}
        save_file(tensors, str(tmp_path / "edge.safetensors"), {"lora_adapter_metadata": json.dumps(value)})
        assert read_adapter(tmp_path / "edge.safetensors", transformer).config["lora_alpha"] == values["lora_alpha"]


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_config_of_the_wrong_types_or_values_is_refused_naming_it(transformer, tmp_path, case):
    value, said = BAD_CONFIGS[case]
    source = local_weights_file(make_random_lora(transformer, tmp_path / "src", rank=4, alpha=4.0))
    with safe_open(str(source), framework="pt") as f:
        tensors, stored = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_adapter_metadata"])
    if isinstance(value, dict):
        value = {**stored, **{f"transformer.{k}": v for k, v in value.items()}}
    save_file(tensors, str(tmp_path / "bad.safetensors"), {"lora_adapter_metadata": json.dumps(value)})
    with pytest.raises(AdapterError) as e:
        read_adapter(tmp_path / "bad.safetensors", transformer)
    assert str(e.value).startswith(f"{tmp_path / 'bad.safetensors'}: {said}"), str(e.value)


@pytest.mark.parametrize("text", ["{not json", "[1]"])
def test_a_peft_config_that_is_not_a_json_object_is_refused_naming_it(transformer, tmp_path, text):
    peft_folder = tmp_path / "peft"
    peft_folder.mkdir()
    q = "base_model.model.transformer_blocks.0.attn.to_q"  # peft's own layout: its config is adapter_config.json
    save_file({f"{q}.lora_A.weight": torch.zeros(2, 32), f"{q}.lora_B.weight": torch.zeros(32, 2)},
              str(peft_folder / "adapter_model.safetensors"))  # fmt: skip
    (peft_folder / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(peft_folder / 'adapter_config.json'))}: not"):
        read_adapter(peft_folder, transformer)


def test_a_device_behind_an_adapter_path_is_refused_naming_it(tmp_path):
    (tmp_path / "x.safetensors").symlink_to("/dev/zero")  # was NotADirectoryError from a folder listing
    with pytest.raises(AdapterError, match="not a file or folder"):
        read_adapter(tmp_path / "x.safetensors")


def test_weights_that_disagree_with_their_own_config_are_refused_in_one_line(
    transformer, tiny_model_dir, tmp_path, capsys
):
    """peft builds each layer from the config, then loads the weights: a rank-4 adapter beside an r=2 config was its
    116-line size-mismatch traceback, and a DoRA config without magnitudes a page of missing keys and a render."""
    state, _, _ = peft_adapter(transformer, {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]})
    adapter_format.write_diffusers(tmp_path / "r2", state, {"r": 2, "lora_alpha": 2, "target_modules": ["to_q"]})
    with pytest.raises(
        AdapterError, match=r"module 'transformer_blocks.0.attn.to_q': lora_A has rank 4, its config says r=2"
    ):
        read_adapter(tmp_path / "r2", transformer)
    adapter_format.write_diffusers(tmp_path / "dora", state, {**DORA, "r": 4, "lora_alpha": 4})
    with pytest.raises(AdapterError) as refused:
        read_adapter(tmp_path / "dora", transformer)
    assert str(refused.value) == (
        f"{tmp_path / 'dora' / adapter_format.WEIGHTS_NAME}: its weights do not match its own config: its config says "
        "use_dora but it holds no DoRA magnitudes (lora_magnitude_vector); save the weights and the config from one "
        "training run"
    )
    # Every misfit counted, the first three named: five modules of rank 4 under an r=2 config.
    many, _, _ = peft_adapter(transformer, {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k"]})
    adapter_format.write_diffusers(
        tmp_path / "many", many, {"r": 2, "lora_alpha": 2, "target_modules": ["to_q", "to_k"]}
    )
    with pytest.raises(AdapterError) as refused:
        read_adapter(tmp_path / "many", transformer)
    said = str(refused.value)
    assert (
        said.count("lora_A has rank 4, its config says r=2") == 3
        and "; module 'transformer_blocks.0.attn.to_q'" in said
    )
    modules = sum(k.endswith("lora_A.weight") for k in many)
    assert said.endswith(f" (and {modules - 3} more); save the weights and the config from one training run")
    # rank_pattern keys are matched as peft matches them (a full name, a tail): the adapter it built reads back.
    patterned, _, _ = peft_adapter(transformer, PATTERNS)
    adapter_format.write_diffusers(tmp_path / "patterns", patterned, PATTERNS)
    assert read_adapter(tmp_path / "patterns", transformer).config["rank_pattern"] == PATTERNS["rank_pattern"]
    # Through the CLI: one error line naming the file, before any image is rendered.
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--steps", "1", "--lora", str(tmp_path / "r2"),
            "--output", str(tmp_path / "o.png")]  # fmt: skip
    assert cli_main(argv) == 2 and not (tmp_path / "o.png").exists()
    (error,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert error.startswith(f"error: {tmp_path / 'r2'}") and "lora_A has rank 4, its config says r=2" in error


def test_a_kohya_file_exports_through_the_cli_against_the_model_it_names(transformer, tiny_model_dir, tmp_path, capsys):
    """export read every layout but kohya's: "needs the model to unflatten its module names", with no way to give it."""
    make_random_lora(transformer, tmp_path / "src", rank=2, alpha=3, targets=MLP)
    kohya = in_layout(tmp_path / "src", tmp_path / "kohya.safetensors", "kohya")
    out = tmp_path / "out.safetensors"
    assert cli_main(["export", str(kohya), "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ours, theirs = (
        comfyui_deltas(load_file(str(in_layout(tmp_path / "src", tmp_path / "c.safetensors", "comfyui")))),
        (comfyui_deltas(load_file(str(out)))),
    )
    assert ours.keys() == theirs.keys()
    for module, delta in ours.items():
        torch.testing.assert_close(theirs[module], delta)
    # Without --model it is unflattened against the released model: the tiny model's layers do not fit it.
    assert cli_main(["export", str(kohya), "--output", str(tmp_path / "o2.safetensors")]) == 2
    assert "does not fit this transformer" in capsys.readouterr().err
    # Naming the released model, offline and uncached, is the same (it was refused as not downloaded).
    assert cli_main(["export", str(kohya), "--model", DEFAULT_MODEL, "--output", str(tmp_path / "o2.safetensors")]) == 2
    assert "does not fit this transformer" in capsys.readouterr().err
    # A mistyped --model fell back to the released model's architecture too: "does not fit", not "not found".
    for wrong in (tmp_path / "nope", tiny_model_dir / "transformer"):
        assert (
            cli_main(["export", str(kohya), "--model", str(wrong), "--output", str(tmp_path / "o3.safetensors")]) == 2
        )
        assert capsys.readouterr().err.startswith(f"error: --model: {wrong} ")
    # Its config.json is all export reads: a folder holding only that will do.
    (tmp_path / "config-only" / "transformer").mkdir(parents=True)
    shutil.copy(tiny_model_dir / "transformer" / "config.json", tmp_path / "config-only" / "transformer")
    assert cli_main(["export", str(kohya), "--model", str(tmp_path / "config-only"), "--output", str(out)]) == 0


def test_an_integer_alpha_reads_as_its_value(transformer, tmp_path, export):
    """kohya and ComfyUI files may store `.alpha` as an integer scalar; the dtype check refused them."""
    make_random_lora(transformer, tmp_path / "src", rank=4, alpha=8.0)
    exported = load_file(str(export(tmp_path / "src")))
    as_int = {k: v.to(torch.int64) if k.endswith(".alpha") else v for k, v in exported.items()}
    save_file(as_int, str(tmp_path / "int_alpha.safetensors"))
    ints, floats = (
        read_adapter(tmp_path / f, transformer).state_dict
        for f in ("int_alpha.safetensors", "src/comfyui_lora.safetensors")
    )
    assert ints.keys() == floats.keys() and all(torch.equal(ints[k], floats[k]) for k in ints)


def test_an_export_says_where_it_came_from(transformer, tmp_path, export):
    """Its header held only kohya's rank and alpha: no source, base model or trigger word to trace it by."""
    run = make_random_lora(transformer, tmp_path / "run", rank=2)
    save_config(
        load_config(None, [f"model.pretrained={DEFAULT_MODEL}", "data.trigger_word=qwnbrand"]), run / "config.yaml"
    )
    with safe_open(str(export(run)), "pt") as f:
        header = f.metadata()
    source = run / adapter_format.WEIGHTS_NAME
    assert header["qwen_image_lora_source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (
        header["qwen_image_lora_base_model"] == DEFAULT_MODEL and header["qwen_image_lora_trigger_word"] == "qwnbrand"
    )
    save_config(load_config(None, [f"model.pretrained={tmp_path / 'home' / 'alice' / 'base'}"]), run / "config.yaml")
    with safe_open(str(export(run)), "pt") as f:
        header = f.metadata()  # a local base by its last name (a header travels with the file)
    assert header["qwen_image_lora_base_model"] == "base" and "qwen_image_lora_trigger_word" not in header


def test_export_checks_every_module_against_the_model_it_is_for(transformer, tmp_path, tiny_model_dir, capsys):
    """A Flux LoRA in diffusers' layout (its blocks' names are Qwen-Image's too) exported as a "ComfyUI" Qwen-Image
    file with exit 0: nothing checked it against any model unless its names were kohya's."""
    flux = tmp_path / "flux_lora.safetensors"
    inner = 3072  # Flux's width; its single-stream blocks exist in no Qwen-Image model
    save_file({f"transformer.{m}.lora_{half}.weight": torch.zeros((4, inner) if half == "A" else (inner, 4))
               for m in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out") for half in "AB"},
              str(flux))  # fmt: skip
    assert cli_main(["export", str(flux)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flux}: does not fit this transformer — made for another model? ")
    assert "module 'single_transformer_blocks.0.proj_out' does not exist in this transformer" in err
    assert "is Linear(in=4096, out=4096) but the adapter has lora_A [4, 3072]" in err  # the released model's width
    assert err.rstrip().endswith(f"(checked against {DEFAULT_MODEL}; --model names the base model it was trained on, "
                                 "its config.json only)")  # fmt: skip
    assert not (tmp_path / "flux_lora_comfyui.safetensors").exists()
    # A tiny model's adapter is refused against the released model, and exports against its own.
    make_random_lora(transformer, tmp_path / "tiny", rank=2)
    assert cli_main(["export", str(tmp_path / "tiny")]) == 2
    assert "is Linear(in=4096, out=4096) but the adapter has lora_A [2, 32]" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "tiny"), "--model", str(tiny_model_dir)]) == 0
