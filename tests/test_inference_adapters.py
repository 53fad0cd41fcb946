"""Adapters on one loaded base model: switch, mix, fuse/unfuse, unload; foreign layouts converted; foreign models refused."""

import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from qwen_image_lora.adapter_format import write_diffusers
from qwen_image_lora.errors import AdapterError, InputError
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.inference.testing import in_layout, make_random_lora


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    """Our own pipeline (adapters get loaded into it), not the session-wide `tiny_pipe`."""
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)


@pytest.fixture(scope="module")
def lora_dirs(gen, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "style_a": make_random_lora(gen.pipe.transformer, root / "style_a", seed=1, std=1.5),
        "style_b": make_random_lora(gen.pipe.transformer, root / "style_b", rank=8, alpha=4, seed=2, std=1.5),
    }


@pytest.fixture
def adapters(gen, lora_dirs):
    """style_a (weight 1.0) and style_b (0.7) loaded; everything unloaded afterwards."""
    gen.adapters.load(lora_dirs["style_a"])
    gen.adapters.load(lora_dirs["style_b"], weight=0.7)
    yield gen.adapters
    gen.adapters.unload()


def render(gen, adapters=None, **kw):
    request = GenerationRequest("a red bottle", num_inference_steps=2, seed=0, adapters=adapters, **kw)
    return np.asarray(gen.generate(request)).astype(np.int16)


def base_weights(transformer):
    return {k: v.clone() for k, v in transformer.state_dict().items() if "lora_" not in k}


def test_two_adapters_at_different_weights_differ_from_each_other_and_from_the_base(gen, adapters):
    base = render(gen)
    a = render(gen, {"style_a": 1.0})
    b = render(gen, {"style_b": 0.7})
    a_half = render(gen, {"style_a": 0.5})
    mix = render(gen, {"style_a": 0.5, "style_b": 0.7})
    outputs = [base, a, b, a_half, mix]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert np.abs(outputs[i] - outputs[j]).mean() > 0.5, (i, j)
    # Switching per call needs no reload, and {} is the base model again.
    assert np.array_equal(render(gen, {}), base)
    assert np.array_equal(render(gen, {"style_a": 1.0}), a)


def test_fuse_then_unfuse_restores_the_base_exactly(gen, adapters):
    before = base_weights(gen.pipe.transformer)
    base = render(gen, {})
    unfused = render(gen, {"style_a": 1.0, "style_b": 0.7})
    adapters.fuse()
    fused = render(gen, {"style_a": 1.0, "style_b": 0.7})
    assert np.abs(fused - unfused).max() <= 1  # same maths, one rounding apart
    with pytest.raises(AdapterError, match="unfuse"):
        render(gen, {"style_a": 1.0})
    adapters.unfuse()
    after = base_weights(gen.pipe.transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(render(gen, {}), base)


def test_unload_gives_back_the_plain_base_model(gen, lora_dirs):
    base = render(gen)
    gen.adapters.load(lora_dirs["style_a"])
    gen.adapters.set({"style_a": 1.0})
    assert not np.array_equal(render(gen), base)
    gen.adapters.unload()
    assert gen.adapters.names == []
    assert np.array_equal(render(gen), base)


def test_an_adapter_at_weight_0_is_the_base_model_dora_included(gen, tmp_path):
    """peft keeps rescaling each row by a DoRA adapter's trained magnitudes at scale 0: `--lora run:0` was not the base
    model, while the studio drops an adapter at 0."""
    transformer = gen.pipe.transformer
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules="all-linear"), adapter_name="p")
    try:
        g = torch.Generator().manual_seed(0)
        for module in transformer.modules():
            if hasattr(module, "lora_magnitude_vector") and "p" in module.lora_magnitude_vector:
                with torch.no_grad():  # trained: B away from zero, magnitudes away from the base rows' norms
                    module.lora_B["p"].weight.copy_(torch.randn(module.lora_B["p"].weight.shape, generator=g))
                    module.lora_magnitude_vector["p"].weight.mul_(3.0)
        state = get_peft_model_state_dict(transformer, adapter_name="p")
    finally:
        transformer.delete_adapters("p")
    targets = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    write_diffusers(tmp_path, state, {"r": 2, "lora_alpha": 2, "use_dora": True, "target_modules": targets})
    base = render(gen)
    gen.adapters.load(tmp_path, name="dora")
    try:
        assert not np.array_equal(render(gen, {"dora": 1.0}), base)
        assert np.array_equal(render(gen, {"dora": 0.0}), base)
        gen.adapters.load(tmp_path, name="dora-2")  # fused at 0 beside another, it changes nothing either
        fused = {}
        for weights in ({"dora": 0.0, "dora-2": 1.0}, {"dora-2": 1.0}):
            gen.adapters.fuse(weights)
            fused[len(weights)] = render(gen, None)
            gen.adapters.unfuse()
        # Fused against fused: a fused DoRA row and the unfused forward differ by rounding, which can flip a pixel.
        assert np.array_equal(fused[2], fused[1])
        assert np.abs(fused[1] - render(gen, {"dora-2": 1.0})).mean() < 0.01  # a wrong adapter moves it > 0.5
    finally:
        gen.adapters.unload()


def test_unknown_adapter_name_lists_the_known_ones(gen, adapters):
    with pytest.raises(AdapterError, match="unknown adapter 'nope'; known adapters: style_a, style_b"):
        render(gen, {"nope": 1.0})


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 100.0, -4.5])
def test_the_python_api_refuses_an_adapter_weight_the_other_edges_refuse(gen, adapters, lora_dirs, weight):
    """The CLI, batch lines and the API's requests refuse these; the Python API rendered NaN as a black, transparent
    image and took 100."""
    with pytest.raises(InputError, match=r"^adapters\['style_a'\]: must be a number from -4.0 to 4.0"):
        render(gen, {"style_a": weight})
    with pytest.raises(InputError, match=r"^adapters\['style_a'\]: must be a number"):
        gen.adapters.set({"style_a": weight})
    with pytest.raises(InputError, match=r"^weight: must be a number from -4.0 to 4.0"):
        gen.adapters.load(lora_dirs["style_a"], name="again", weight=weight)
    assert "again" not in gen.adapters.names


@pytest.mark.parametrize("layout", ["comfyui", "kohya", "ai-toolkit"])
def test_foreign_layouts_load_as_the_same_adapter(gen, lora_dirs, tmp_path, layout):
    ours = (
        lora_dirs["style_b"] / "pytorch_lora_weights.safetensors"
    )  # alpha 4 / rank 8: the scale 0.5 travels as .alpha
    other = in_layout(ours, tmp_path / f"style_b_{layout}.safetensors", layout)
    try:
        gen.adapters.load(ours, name="ours")
        gen.adapters.load(other, name="theirs")
        assert gen.adapters.loaded["theirs"].layout == layout
        theirs, same = render(gen, {"theirs": 1.0}), render(gen, {"ours": 1.0})
        assert np.abs(theirs - same).max() <= 1
        # ... and the scale was neither dropped nor applied twice: half the scale is visibly further away.
        assert np.abs(theirs - render(gen, {"ours": 0.5})).mean() > 10 * np.abs(theirs - same).mean()
    finally:
        gen.adapters.unload()


def _tamper(src, dst, fn):
    tensors = load_file(str(src / "pytorch_lora_weights.safetensors"))
    save_file(fn(tensors), str(dst))
    return dst


def test_adapter_for_another_model_is_refused_naming_module_and_shapes(gen, lora_dirs, tmp_path):
    def wider(t):
        key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
        return {**t, key: torch.zeros(4, 3072)}

    bad = _tamper(lora_dirs["style_a"], tmp_path / "wide.safetensors", wider)
    with pytest.raises(
        AdapterError, match=r"'transformer_blocks.0.attn.to_q' is Linear\(in=32, out=32\).*lora_A \[4, 3072\]"
    ):
        gen.adapters.load(bad)

    def deeper(t):
        return {k.replace("blocks.1.", "blocks.7."): v for k, v in t.items()}

    bad = _tamper(lora_dirs["style_a"], tmp_path / "deep.safetensors", deeper)
    with pytest.raises(AdapterError, match="'transformer_blocks.7.attn.to_q' does not exist"):
        gen.adapters.load(bad)

    kohya = in_layout(lora_dirs["style_a"], tmp_path / "k.safetensors", "kohya")
    renamed = {k.replace("attn_to_q", "attn_to_qkv"): v for k, v in load_file(str(kohya)).items()}
    save_file(renamed, str(tmp_path / "k2.safetensors"))
    with pytest.raises(AdapterError, match="transformer_blocks_0_attn_to_qkv.*does not exist"):
        gen.adapters.load(tmp_path / "k2.safetensors")
    assert gen.adapters.names == [] and not getattr(gen.pipe.transformer, "peft_config", {})


def test_files_that_are_not_loras_are_refused(gen, tmp_path):
    save_file({"transformer_blocks.0.attn.to_q.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "lokr.safetensors"))
    with pytest.raises(AdapterError, match="LoKr"):
        gen.adapters.load(tmp_path / "lokr.safetensors")
    with pytest.raises(AdapterError, match="no such adapter"):
        gen.adapters.load(tmp_path / "missing")


def test_prompt_over_1024_tokens_is_an_error_naming_the_length(gen):
    long = "red bottle " * 700
    n = gen.count_tokens(long)
    assert n > 1024
    with pytest.raises(ValueError, match=f"prompt: {n} tokens .* limit is 1024"):
        gen.generate(GenerationRequest(long, num_inference_steps=1))
    with pytest.raises(ValueError, match="images: give at most 10 input images"):
        gen.generate(GenerationRequest("x", images=[object()] * 11, num_inference_steps=1))


def test_a_dotted_file_name_loads_and_a_repeated_folder_name_gets_its_own(gen, lora_dirs, tmp_path):
    """peft keys layers by the adapter name, which can't hold a '.': style-v1.5.safetensors crashed every inference
    command; two runs' folders of one name were refused with no way to name them."""
    dotted = tmp_path / "style-v1.5.safetensors"
    dotted.write_bytes((lora_dirs["style_a"] / "pytorch_lora_weights.safetensors").read_bytes())
    same_stem = tmp_path / "other" / "style_a"
    shutil.copytree(lora_dirs["style_b"], same_stem)
    try:
        assert gen.adapters.load(dotted) == "style-v1_5"
        assert [gen.adapters.load(lora_dirs["style_a"]), gen.adapters.load(same_stem)] == ["style_a", "style_a-2"]
        assert np.array_equal(render(gen, {"style-v1_5": 1.0}), render(gen, {"style_a": 1.0}))
        assert not np.array_equal(render(gen, {"style_a-2": 1.0}), render(gen, {"style_a": 1.0}))
        with pytest.raises(AdapterError, match=r"adapter name 'v1\.5'.*e\.g\. 'v1_5'"):
            gen.adapters.load(dotted, name="v1.5")
    finally:
        gen.adapters.unload()
