"""Masked edits: kept pixels come back identical, the changed region changes, and the latent blend really runs."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import distance_transform_edt

from qwen_image_lora import model as qmodel
from qwen_image_lora.cli import main
from qwen_image_lora.inference import mask_rules, masking
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.inference.testing import make_random_lora
from tests.unchosen import unchosen_seeds

W, H = 160, 96  # non-square, not the working size: the result must still come back at exactly this size


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=96)


def product(mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (H, W, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = np.linspace(40, 255, W, dtype=np.uint8)[None, :]
    return Image.fromarray(pixels, mode)


def right_half_mask() -> Image.Image:
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2 :] = 255
    return Image.fromarray(mask, "L")


def random_mask(rng: np.random.Generator, size: tuple[int, int], soft: bool = False) -> Image.Image:
    """White shapes on black: a filled body, maybe more bodies and thin rings (a mug's handle); `soft` blurs the
    edges into grey while the body's middle stays white."""
    w, h = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for i in range(int(rng.integers(1, 4))):
        bw, bh = int(rng.integers(16, max(17, w // 2))), int(rng.integers(16, max(17, h // 2)))
        x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        box = (x, y, x + bw - 1, y + bh - 1)
        kind = "rectangle" if i == 0 else rng.choice(["rectangle", "ellipse", "ring"])
        if kind == "ring":
            draw.ellipse(box, outline=255, width=int(rng.integers(2, 6)))
        else:
            getattr(draw, kind)(box, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(1, 3)))) if soft else mask


def edit(gen, image, mask, **kw) -> Image.Image:
    request = GenerationRequest(
        "replace the background with white", images=[image], mask=mask, num_inference_steps=3, **kw
    )
    return gen.generate(request)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_pixels_outside_the_mask_are_the_input_exactly_and_inside_they_change(gen, mode):
    image, mask = product(mode), right_half_mask()
    out = edit(gen, image, mask, mask_feather=4)
    assert out.size == image.size and out.mode == image.mode
    got, want = np.asarray(out).astype(int), np.asarray(image).astype(int)
    kept = np.asarray(mask) < 128
    assert np.array_equal(got[kept], want[kept])  # alpha included for RGBA
    assert np.abs(got[~kept] - want[~kept]).mean() > 5


def test_an_opaque_render_is_rgb_and_a_transparent_one_keeps_its_alpha(gen, monkeypatch):
    """A plain edit of an RGB photo came back RGBA with the alpha all 255, where its masked edit came back RGB."""
    request = GenerationRequest("a bottle on marble", num_inference_steps=1, seed=3)  # as an edit, without its resize
    made = gen.generate(request)
    assert made.mode == "RGBA" and made.getchannel("A").getextrema()[0] < 255  # the tiny model's alpha: kept
    real = gen.pipe

    class Opaque:  # the real pipeline, its image made opaque: what the real model gives a product photo
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **kwargs):
            out = real(**kwargs)
            out.images[0].putalpha(255)
            return out

    monkeypatch.setattr(gen, "pipe", Opaque())
    opaque = gen.generate(request)
    assert opaque.mode == "RGB" and np.array_equal(np.asarray(opaque), np.asarray(made.convert("RGB")))
    assert edit(gen, product("RGB"), right_half_mask()).mode == "RGB"  # as a masked edit of the same photo


def test_the_latent_blend_holds_the_kept_region_on_the_inputs_noised_latents_every_step(gen, monkeypatch):
    """Fails if only the final pixel composite existed: the sampler's own latents must be pinned each step."""
    seen = []

    class Recording(masking.LatentBlend):
        def __call__(self, pipe, step, timestep, tensors):
            out = super().__call__(pipe, step, timestep, tensors)
            seen.append(
                (float(pipe.scheduler.sigmas[pipe.scheduler.step_index]), out["latents"].clone(), self.last_kept)
            )
            return out

    monkeypatch.setattr(masking, "LatentBlend", Recording)  # our own class, so the generator records its blend
    edit(gen, product(), right_half_mask())
    blend = gen.last_blend
    assert isinstance(blend, Recording) and len(seen) == 3
    keep = (blend.mask == 0).expand_as(blend.x0)
    assert keep.any() and (~keep).any()
    for sigma, latents, kept in seen:
        expected = (1 - sigma) * blend.x0 + sigma * blend.noise
        torch.testing.assert_close(kept, expected)
        torch.testing.assert_close(latents[keep], expected[keep])
        assert not torch.allclose(latents[~keep], expected[~keep])  # the changed region is the sampler's
    assert seen[-1][0] == 0.0  # after the last step the kept latents are the input's own latents
    torch.testing.assert_close(seen[-1][1][keep], blend.x0[keep])


def test_the_kept_latents_are_the_pipelines_own_encoding_of_the_input(gen):
    image, mask = product(), right_half_mask()
    width, height = gen._size(GenerationRequest("x", images=[image]))
    blend = masking.LatentBlend(gen.pipe, image, mask_rules.prepare_mask(mask, image.size), width, height, seed=0)
    pixels = gen.pipe.image_processor.preprocess(image.convert("RGBA"), width=width, height=height).unsqueeze(2)
    own = gen.pipe._encode_vae_image(pixels, generator=None)
    torch.testing.assert_close(blend.x0, qmodel.pack(own))


def test_masked_edit_with_an_adapter_and_two_reference_images(gen, tmp_path):
    lora = make_random_lora(gen.pipe.transformer, tmp_path / "lora", seed=3)
    gen.adapters.load(lora)
    try:
        image, mask = product(), right_half_mask()
        reference = Image.new("RGB", (64, 64), (200, 30, 30))
        request = GenerationRequest(
            "put it on the red cloth", images=[reference, image], mask=mask, num_inference_steps=2
        )
        with_adapter = np.asarray(gen.generate(GenerationRequest(**{**request.__dict__, "adapters": {"lora": 1.0}})))
        base = np.asarray(gen.generate(GenerationRequest(**{**request.__dict__, "adapters": {}})))
    finally:
        gen.adapters.unload()
    kept = np.asarray(mask) < 128
    assert np.array_equal(with_adapter[kept], np.asarray(image)[kept])  # the mask applies to the last image
    assert np.abs(with_adapter[~kept].astype(int) - base[~kept]).mean() > 1  # the adapter changed the edit


def test_bad_masks_get_clear_errors(gen, caplog):
    image = product()
    with pytest.raises(mask_rules.MaskError, match="changes nothing"):
        edit(gen, image, Image.new("L", image.size, 0))
    with pytest.raises(mask_rules.MaskError, match="aspect ratio"):
        edit(gen, image, Image.new("L", (100, 100), 255))
    with pytest.raises(ValueError, match="needs an image"):
        gen.generate(GenerationRequest("x", mask=right_half_mask()))
    with caplog.at_level(logging.WARNING):
        mask_rules.prepare_mask(Image.new("L", image.size, 255), image.size)
    assert "plain edit" in caplog.text
    # Same aspect, other scale: resized, not refused.
    assert mask_rules.prepare_mask(right_half_mask().resize((W // 2, H // 2)), image.size).size == image.size


def test_a_mask_of_the_same_aspect_at_another_scale_is_scaled_bilinearly():
    """Bilinear: no ringing at the painted edge (PIL's default for a grey image is bicubic, which overshoots there)."""
    small = Image.fromarray(np.repeat(np.array([[0, 0, 60, 255, 255, 255]], np.uint8), 3, 0), "L")
    scaled = np.asarray(mask_rules.prepare_mask(small, (24, 12))).astype(int)
    assert np.array_equal(scaled, np.asarray(small.resize((24, 12), Image.Resampling.BILINEAR)))
    assert not np.array_equal(scaled, np.asarray(small.resize((24, 12), Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("subject", [False, True])
def test_every_check_of_a_mask_draws_white_from_128_up(subject, caplog):
    """128 is the line between kept and may change (or background and subject) in the composite; the checks of a
    black, a white and a half mask draw it at the same value, not one grey level off."""
    size = (8, 4)

    def grey(*values) -> Image.Image:
        return Image.fromarray(np.repeat(np.array([values], np.uint8).repeat(8 // len(values), 1), 4, 0), "L")

    black = "no subject \\(it is black everywhere\\)" if subject else "the mask changes nothing"
    with pytest.raises(mask_rules.MaskError, match=f"^mask: {black}"):
        mask_rules.prepare_mask(grey(127), size, subject=subject)
    with caplog.at_level(logging.WARNING):
        mask_rules.prepare_mask(grey(0, 128), size, subject=subject)  # 128 is painted
        mask_rules.prepare_mask(grey(127, 255), size, subject=subject)  # 127 is not
    assert "plain edit" not in caplog.text
    if subject:
        with pytest.raises(mask_rules.MaskError, match="^mask: the subject covers the whole image"):
            mask_rules.prepare_mask(grey(128), size, subject=True)
    else:
        with caplog.at_level(logging.WARNING):
            mask_rules.prepare_mask(grey(128), size)
        assert "mask: white everywhere, so this is a plain edit (nothing is kept)" in caplog.text


@pytest.mark.parametrize("paint", [(255, 255, 255), (255, 220, 0), (255, 0, 0), (0, 0, 0)])
def test_a_mask_painted_in_one_colour_on_a_transparent_layer_is_its_alpha_soft_edge_included(paint):
    """Only a flat grey layer counted: a yellow brush read as "white everywhere" (a plain edit), a red one as "black
    everywhere" (refused), and GIMP's white brush over (0, 0, 0, 0) lost its soft edge to the hidden black."""
    coverage = np.zeros((32, 64), np.uint8)
    coverage[:, 40:] = 255
    coverage[:, 32:40] = np.linspace(0, 255, 10)[1:-1].astype(np.uint8)  # a soft edge
    layer = np.zeros((32, 64, 4), np.uint8)  # untouched pixels: (0, 0, 0, 0), as an editor stores them
    layer[coverage > 0, :3] = paint
    layer[..., 3] = coverage
    layer[0, 33, :3] = np.clip(np.array(paint) + 40, 0, 255) if paint != (255, 255, 255) else 200  # a faint pixel's
    read = mask_rules.prepare_mask(Image.fromarray(layer, "RGBA"), (64, 32))  # rounded colour (a canvas export)
    assert np.array_equal(np.asarray(read), coverage)
    grey_alpha = Image.fromarray(np.stack([np.full_like(coverage, 200), coverage], -1), "LA")
    assert np.array_equal(np.asarray(mask_rules.prepare_mask(grey_alpha, (64, 32))), coverage)


def test_a_transparent_layer_of_several_colours_is_read_by_its_brightness_and_a_clear_one_changes_nothing():
    """Only one flat colour (wherever alpha > 0) means the alpha carries the mask; black and white paint over a
    transparent margin is a brightness mask. A layer with nothing painted is refused, as a black mask is."""
    layer = np.zeros((32, 64, 4), np.uint8)
    layer[:, 8:56, 3] = 255  # a transparent margin around a black-and-white mask
    layer[:, 32:56, :3] = 255
    read = np.asarray(mask_rules.prepare_mask(Image.fromarray(layer, "RGBA"), (64, 32)))
    assert read[16, 20] == 0 and read[16, 40] == 255 and read[16, 60] == 0
    with pytest.raises(mask_rules.MaskError, match="changes nothing"):
        mask_rules.prepare_mask(Image.new("RGBA", (64, 32), (255, 255, 255, 0)), (64, 32))
    faint = np.zeros((32, 64, 4), np.uint8)  # paint that nowhere shows clearly (white and black at alpha 100)
    faint[:, 32:] = (255, 255, 255, 100)
    faint[:, 48:, :3] = 0
    with pytest.raises(mask_rules.MaskError, match="changes nothing"):
        mask_rules.prepare_mask(Image.fromarray(faint, "RGBA"), (64, 32))
    painted = Image.new("P", (64, 32), 0)
    painted.putpalette([0, 0, 0, 255, 0, 0])
    painted.paste(1, (32, 0, 64, 32))
    painted.info["transparency"] = 0  # a red brush on a clear palette layer
    assert np.asarray(mask_rules.prepare_mask(painted, (64, 32)))[16, 30:34].tolist() == [0, 0, 255, 255]


def test_an_opaque_mask_is_read_by_its_brightness_whatever_its_mode():
    opaque = np.zeros((32, 64, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[:, 32:, :3] = 255  # white on the right: may change
    assert np.array_equal(np.asarray(mask_rules.prepare_mask(Image.fromarray(opaque, "RGBA"), (64, 32)))[0, 30:34],
                          [0, 0, 255, 255])  # fmt: skip
    with pytest.raises(mask_rules.MaskError, match="changes nothing"):  # was its alpha: white everywhere
        mask_rules.prepare_mask(Image.new("RGBA", (64, 32), (0, 0, 0, 255)), (64, 32))


def test_the_feather_band_of_a_transparent_input_mixes_no_hidden_colour():
    """A plain per-channel mix brought the colour under the input's transparent pixels into the band: white over a
    clear (0, 0, 0, 0) input came out grey, a dark halo around a sticker."""
    clear = Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    white = Image.new("RGBA", (64, 32), (255, 255, 255, 255))
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))
    out = np.asarray(masking.composite(white, clear, mask, feather=8)).astype(int)
    band = out[16, 32:41]
    assert (band[:, :3] == 255).all() and 0 < band[0, 3] < 255 and (np.diff(band[:, 3]) >= 0).all()
    assert (out[:, :32] == 0).all() and (out[:, 41:] == 255).all()  # kept exactly; deep inside, the result
    # Two opaque colours mix as before; a half-transparent input's hidden colour stays its own where it is kept.
    red, blue = Image.new("RGBA", (64, 32), (255, 0, 0, 255)), Image.new("RGBA", (64, 32), (0, 0, 255, 128))
    mixed = np.asarray(masking.composite(red, blue, mask, feather=8)).astype(int)
    assert (mixed[:, :32] == [0, 0, 255, 128]).all() and (mixed[:, 41:] == [255, 0, 0, 255]).all()
    middle = mixed[16, 36]
    assert middle[0] > 0 and middle[2] > 0 and 128 < middle[3] < 255


@pytest.mark.parametrize("seed", [*range(4), *unchosen_seeds(2)])
def test_a_transparent_inputs_band_shows_over_any_background_as_the_mix_of_the_two_shown_over_it(seed):
    """What mixing as colour times alpha means: over any opaque background, each band pixel looks like the weighted
    mix of the result and the input each seen over that background; kept pixels are the input's exactly (hidden
    colour too), the changed ones deeper in the result's; the weight ramps linearly with the distance."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(30, 90)), int(rng.integers(30, 90))
    mask, feather = random_mask(rng, (w, h), soft=seed % 2 == 1), int(rng.choice([1, 4, 9]))
    result, original = (rng.integers(0, 256, (h, w, 4), dtype=np.uint8) for _ in "ab")
    original[..., 3] = np.where(rng.random((h, w)) < 0.3, 0, original[..., 3])  # clear pixels, hidden colour kept
    out = np.asarray(masking.composite(Image.fromarray(result, "RGBA"), Image.fromarray(original, "RGBA"), mask,
                                       feather)).astype(np.float64)  # fmt: skip
    weight = np.asarray(masking.feathered_alpha(mask, feather)).astype(np.float64)
    assert np.array_equal(out[weight == 0], original[weight == 0]) and np.array_equal(out[weight == 255],
                                                                                       result[weight == 255])  # fmt: skip
    depth = distance_transform_edt(np.asarray(mask) >= 128)
    band = (weight > 0) & (weight < 255)
    assert np.abs(weight[band] - 255 * depth[band] / (feather + 1)).max() <= 0.5  # linear, as the README says
    k = (weight / 255)[..., None]

    def over(image, background):  # an RGBA array shown over an opaque colour
        a = image[..., 3:] / 255
        return image[..., :3] * a + background * (1 - a)

    for background in (0.0, 255.0, np.array([30.0, 200.0, 90.0])):
        expected = k * over(result.astype(np.float64), background) + (1 - k) * over(original, background)
        assert np.abs(over(out, background) - expected)[band].max() <= 1.5  # rounding to 8 bits, twice


def test_composite_feathers_only_inside_the_changed_region():
    original = Image.new("RGB", (64, 32), (0, 0, 0))
    result = Image.new("RGB", (64, 32), (255, 255, 255))
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))
    out = np.asarray(masking.composite(result, original, mask, feather=6))[:, :, 0].astype(int)
    assert (out[:, :32] == 0).all()  # kept: exactly the original
    assert (out[:, 60:] == 255).all()  # deep inside the changed region: exactly the result
    ramp = out[16, 32:44]
    assert 0 < ramp[0] < 255 and (np.diff(ramp) >= 0).all()  # a soft edge that rises into the changed region
    hard = np.asarray(masking.composite(result, original, mask, feather=0))[:, :, 0]
    assert (hard[:, 32:] == 255).all() and (hard[:, :32] == 0).all()


@pytest.mark.parametrize("seed", [*range(6), *unchosen_seeds(3)])
def test_the_mix_band_is_at_most_feather_pixels_wide_inside_the_changed_region(seed):
    """Was a blur whose ramp ran about 2.25x the stated width (18 px for "8 px") and never quite reached the result."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(40, 160)), int(rng.integers(40, 160))
    mask = random_mask(rng, size, soft=seed % 2 == 1)
    feather = int(rng.choice([0, 1, 3, 8, 13]))
    original, result = (Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in "ab")
    out = np.asarray(masking.composite(result, original, mask, feather))
    changed = np.asarray(mask) >= 128
    depth = distance_transform_edt(changed)  # px from the kept region, 0 on it
    assert np.array_equal(out[~changed], np.asarray(original)[~changed])
    assert np.array_equal(out[depth > feather], np.asarray(result)[depth > feather])
    alpha = np.asarray(masking.feathered_alpha(mask, feather)).astype(int)
    band = (depth > 0) & (depth <= feather)
    assert ((alpha > 0) & (alpha < 255) == band).all()  # every band pixel mixes, none outside it does
    order = np.argsort(depth[band], kind="stable")
    assert (np.diff(alpha[band][order]) >= 0).all()  # the ramp rises into the changed region


@pytest.mark.parametrize("seed", range(3))
def test_edit_refuses_a_bad_mask_before_loading_the_model(tmp_path, capsys, seed, unloadable_model):
    """The model cannot load, so loading it would fail naming model.pretrained: the --mask error proves the mask was
    checked first (it used to come after the model had loaded)."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(48, 400)), int(rng.integers(48, 400))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    other = (w, int(h * rng.uniform(1.1, 2))) if seed % 2 else (int(w * rng.uniform(1.1, 2)), h)
    cases = {
        "aspect ratio": Image.new("L", other, 255),
        "changes nothing": Image.new("L", (w, h), int(rng.integers(0, 128))),
    }
    for message, mask in cases.items():
        mask.save(tmp_path / "mask.png")
        rc = main(
            [
                "edit",
                "--model",
                str(unloadable_model),
                "--image",
                str(tmp_path / "in.png"),
                "--mask",
                str(tmp_path / "mask.png"),
                "--prompt",
                "x",
                "--output",
                str(tmp_path / "out.png"),
            ]
        )
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1, errors
        assert errors[0].startswith("error: --mask") and message in errors[0], errors[0]


def test_masked_edit_from_the_cli_and_a_batch_job(tiny_model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    image, mask = product(), right_half_mask()
    image.save(tmp_path / "in" / "sku.png")
    mask.save(tmp_path / "in" / "sku_mask.png")
    tiny = ["--model", str(tiny_model_dir), "--dtype", "float32", "data.resolution=96", "--steps", "2"]
    out = tmp_path / "cli.png"
    assert (
        main(
            [
                "edit",
                *tiny,
                "--image",
                str(tmp_path / "in" / "sku.png"),
                "--mask",
                str(tmp_path / "in" / "sku_mask.png"),
                "--prompt",
                "on marble",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    kept = np.asarray(mask) < 128
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB"))[kept], np.asarray(image)[kept])
    # A batch job: paths relative to the jobs file, in a subfolder.
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps(
            {"id": "sku", "prompt": "on marble", "images": ["in/sku.png"], "mask": "in/sku_mask.png", "mask_feather": 2}
        )
        + "\n"
    )
    assert main(["batch", str(jobs), "--output-dir", str(tmp_path / "out"), *tiny[:-2], "--no-progress"]) == 0
    got = np.asarray(Image.open(tmp_path / "out" / "sku.png").convert("RGB"))
    assert (
        np.array_equal(got[kept], np.asarray(image)[kept])
        and np.abs(got[~kept].astype(int) - np.asarray(image)[~kept]).mean() > 5
    )
    jobs.write_text(json.dumps({"prompt": "x", "mask": "in/sku_mask.png"}) + "\n")
    assert main(["batch", str(jobs), "--output-dir", str(tmp_path / "out2"), *tiny[:-2]]) == 2  # a mask needs images


def test_a_white_mask_is_said_once_by_the_cli(tiny_model_dir, tmp_path, caplog):
    """The CLI's check before the model loads and the generator's own both said it: the line came twice."""
    image = product()
    image.save(tmp_path / "sku.png")
    Image.new("L", image.size, 255).save(tmp_path / "white.png")
    args = ["edit", "--model", str(tiny_model_dir), "--dtype", "float32", "data.resolution=96", "--steps", "1"]
    args += ["--image", str(tmp_path / "sku.png"), "--mask", str(tmp_path / "white.png"), "--prompt", "x"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--output", str(tmp_path / "out.png")]) == 0
    assert caplog.text.count("white everywhere, so this is a plain edit") == 1
