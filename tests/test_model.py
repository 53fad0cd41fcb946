"""The tiny checkpoint: layout, size, tokenizer, and that it loads and runs through the same loader as a hub id."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline
from PIL import Image
from safetensors.torch import load_file

from qwen_image_lora import model as qmodel
from qwen_image_lora.cli import main
from qwen_image_lora.errors import InputError
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.tiny_model import make_tiny_model


def test_layout_and_size(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline"
    for sub in ("transformer", "vae", "text_encoder", "processor", "scheduler"):
        assert sub in index and (tiny_model_dir / sub).is_dir()
    assert (tiny_model_dir / "processor" / "tokenizer.json").is_file()
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_builder_is_seed_deterministic(tmp_path):

    a = load_file(make_tiny_model(tmp_path / "a", seed=3) / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", seed=3) / "transformer" / "diffusion_pytorch_model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", seed=4) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tokenizer_has_qwen_special_tokens_and_chat_template(tiny_pipe):
    tok = tiny_pipe.processor.tokenizer
    for special in (
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|vision_pad|>",
        "<|video_pad|>",
        "<|endoftext|>",
    ):
        ids = tok.encode(special)
        assert len(ids) == 1, special  # one token, not split by BPE
    assert len(tok.encode("a photo of the product")) < len("a photo of the product")  # real merges
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    plain = [{"role": "user", "content": "hello"}]
    assert tiny_pipe.processor.apply_chat_template(parts, tokenize=False) == tiny_pipe.processor.apply_chat_template(
        plain, tokenize=False
    )


def test_plain_diffusers_from_pretrained_loads_it(tiny_model_dir):

    pipe = QwenImage21Pipeline.from_pretrained(tiny_model_dir)
    assert type(pipe.transformer).__name__ == "QwenImage21Transformer2DModel"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained: .* has no model_index.json"):
        qmodel.load_pipeline(tmp_path)


def test_an_incomplete_or_damaged_model_folder_is_one_line_naming_its_component(tiny_model_dir, tmp_path, capsys):
    """A folder with its model_index.json but a file missing, cut short or garbled ended in diffusers' or
    transformers' traceback (`OSError: Error no file named config.json`, `ValueError: Couldn't instantiate the backend
    tokenizer`)."""
    damages = {
        "transformer": lambda m: (m / "transformer" / "config.json").unlink(),
        "vae": lambda m: (m / "vae" / "config.json").write_text("{cut sh"),
        "processor": lambda m: [p.unlink() for p in (m / "processor").glob("tokenizer*")],
    }
    for component, damage in damages.items():
        model = tmp_path / component
        shutil.copytree(tiny_model_dir, model)
        damage(model)
        with pytest.raises(InputError, match=rf"^model\.pretrained: {model} could not be loaded: its {component} is "):
            qmodel.load_pipeline(model, "float32")
    weights = tmp_path / "transformer" / "transformer" / "diffusion_pytorch_model.safetensors"
    shutil.copytree(tiny_model_dir / "transformer", weights.parent, dirs_exist_ok=True)
    with open(weights, "r+b") as f:
        f.truncate(1000)
    argv = ["generate", "--model", str(tmp_path / "transformer"), "--prompt", "x", "--output", str(tmp_path / "o.png")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line.startswith("error: model.pretrained: ") and "its transformer is incomplete or damaged (Unable to" in line
    )
    assert line.endswith("copy or download it again (`qwen-lora make-tiny-model DIR` writes a tiny test one)")


def _photo(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def test_generate_and_edit_sizes(tiny_pipe):
    gen = Generator(tiny_pipe, resolution=64)
    t2i = gen.generate(GenerationRequest("a red bottle", width=96, height=64, num_inference_steps=2))
    assert t2i.size == (96, 64) and t2i.mode == "RGBA"
    edit = gen.generate(GenerationRequest("replace the background", images=[_photo(100, 70)], num_inference_steps=2))
    assert edit.size == (100, 70)  # returned at the input's size
    multi = gen.generate(
        GenerationRequest(
            "combine them", images=[_photo(64, 64, 1), _photo(96, 64, 2)], num_inference_steps=2, keep_input_size=False
        )
    )
    assert multi.size == qmodel.fit_size(96, 64, 64)


def test_predict_velocity_matches_the_pipeline_call(tiny_pipe):
    """Our transformer call (used by training) equals the one the pipeline makes, for an edit."""
    captured = {}

    def hook(module, args, kwargs, output):
        captured.setdefault("kwargs", kwargs)
        captured.setdefault("out", output[0])

    handle = tiny_pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    src = _photo(64, 64)
    try:
        Generator(tiny_pipe, resolution=64).generate(
            GenerationRequest("make it blue", images=[src], num_inference_steps=1, keep_input_size=False)
        )
    finally:
        handle.remove()
    kw = captured["kwargs"]
    prompt = qmodel.encode_prompt(tiny_pipe, ["make it blue"], [src])
    cond = qmodel.encode_latents(tiny_pipe, qmodel.image_to_pixels(tiny_pipe, src))
    n_target = 4 * 4
    noisy = qmodel.unpack(kw["hidden_states"][:, -n_target:], 4, 4)
    torch.testing.assert_close(qmodel.pack(cond), kw["hidden_states"][:, :-n_target])
    ours = qmodel.predict_velocity(tiny_pipe.transformer, noisy, prompt, kw["timestep"], [cond])
    torch.testing.assert_close(ours, qmodel.unpack(captured["out"][:, -n_target:], 4, 4))


def _denormalise(vae, latents):
    """The pipeline's own step before `vae.decode` (QwenImage21Pipeline.__call__): latents * std + mean."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return latents * torch.tensor(vae.config.latents_std).view(shape) + torch.tensor(vae.config.latents_mean).view(
        shape
    )


def test_encode_latents_are_the_normalised_vae_mode(tiny_pipe, sample_data_dir):
    vae = tiny_pipe.vae
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    assert mean.abs().min() > 0.01 and (std - 1).abs().min() > 0.01  # a skipped normalisation must show
    pixels = qmodel.image_to_pixels(tiny_pipe, Image.open(sample_data_dir / "brand" / "000.png"))
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
    ours = qmodel.encode_latents(tiny_pipe, pixels)
    torch.testing.assert_close(ours, (mode - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1))


def test_an_image_off_the_32_pixel_grid_on_either_side_is_refused_with_its_size(tiny_pipe):
    """A side off the grid would be resized by the image processor and no longer match its bucket's latents."""
    for size in ((64, 48), (48, 64), (40, 40)):
        with pytest.raises(ValueError, match=rf"image size {size[0]}x{size[1]}: both sides must be multiples of 32"):
            qmodel.image_to_pixels(tiny_pipe, Image.new("RGB", size))
    assert qmodel.image_to_pixels(tiny_pipe, Image.new("RGB", (64, 32))).shape == (1, 4, 1, 32, 64)


def test_the_pipeline_decodes_our_latents_back_to_the_image(tiny_pipe, sample_data_dir):
    """Every sample image: our latents, through the pipeline's decode path, give the image back (the tiny VAE
    keeps the mean of each 8x8 block, so only edges and the logo text blur)."""
    errors = []
    for path in sorted(sample_data_dir.rglob("*.png")):
        image = Image.open(path).convert("RGB")
        latents = qmodel.encode_latents(tiny_pipe, qmodel.image_to_pixels(tiny_pipe, image))
        with torch.no_grad():
            decoded = tiny_pipe.vae.decode(_denormalise(tiny_pipe.vae, latents)).sample[:, :, 0]
        back = tiny_pipe.image_processor.postprocess(decoded, output_type="pil")[0].convert("RGB")
        errors.append(np.abs(np.asarray(back, float) - np.asarray(image, float)).mean())
    assert len(errors) >= 20
    assert np.mean(errors) < 5 and max(errors) < 10, errors  # in 0..255 units; a random VAE gives ~80


def test_downsampling_vae_checkpoint_has_the_real_geometry_and_our_latent_grid(tmp_path, tiny_pipe):
    """The variant diffusers' example script accepts: its VAE downsamples 2x four times (the example requires
    2 ** len(temperal_downsample) == 16), gives the reconstructing VAE's latent grid and channels, and the
    checkpoint generates through our path."""

    folder = make_tiny_model(tmp_path / "ds", downsampling_vae=True)
    pipe = qmodel.load_pipeline(folder, dtype="float32")
    assert 2 ** len(pipe.vae.temperal_downsample) == 16 and pipe.vae.config.patch_size is None
    image = Image.new("RGB", (96, 64), (200, 30, 60))
    ours = qmodel.encode_latents(pipe, qmodel.image_to_pixels(pipe, image))
    reference = qmodel.encode_latents(tiny_pipe, qmodel.image_to_pixels(tiny_pipe, image))
    assert ours.shape == reference.shape == (1, 16, 1, 4, 6)
    gen = Generator(pipe, resolution=64)
    out = gen.generate(GenerationRequest("a red square", width=96, height=64, num_inference_steps=2))
    assert out.size == (96, 64)
