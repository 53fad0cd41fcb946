"""Every image says how it was made: the settings written into PNG, WebP and JPEG by generate, edit, batch and the
API, read back, and `--from` re-creating an image pixel for pixel while its adapter and inputs keep their sha256."""

import base64
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from qwen_image_lora.cli import main
from qwen_image_lora.config import Config
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import encode_image, read_png_text, read_settings
from qwen_image_lora.inference.batch import run_batch
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.inference.jobs import read_jobs
from qwen_image_lora.inference.server import create_app
from qwen_image_lora.inference.testing import make_random_lora
from qwen_image_lora.knobs import SettingError

TINY = ["--dtype", "float32", "data.resolution=64"]
KEY = "settings-key-0123456789"


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)


def test_settings_survive_png_webp_and_jpeg_and_other_tools_metadata_is_not_taken_for_ours():
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (24, 32, 4), dtype=np.uint8), "RGBA")
    settings = {"prompt": "ein Fläschchen, 瓶", "seed": 7, "loras": [{"name": "brand", "weight": 0.8}]}
    for fmt in ("png", "webp", "jpeg"):
        data = encode_image(image, fmt, 90, settings)
        assert read_settings(data) == settings | ({} if fmt == "png" else {"quality": 90}), fmt  # a lossy file's too
        assert data == encode_image(image, fmt, 90, settings)  # no timestamp: the same settings, the same bytes
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(encode_image(image, "png", settings=settings)))), np.asarray(image)
    )

    assert "瓶".encode() in encode_image(image, "png", settings=settings)  # iTXt holds UTF-8, not \u escapes

    long = {"prompt": "-" * 70_000}  # past what one JPEG EXIF segment holds: said, not a bare PIL ValueError
    with pytest.raises(InputError, match="write PNG or WebP") as refused:
        encode_image(image, "jpeg", settings=long)
    assert refused.value.field == "output"
    assert read_settings(encode_image(image, "webp", settings=long)) == long | {"quality": 95}

    assert read_settings(encode_image(image, "png")) is None
    theirs = Image.Exif()  # a camera's or an editor's comment is not ours, even when it is JSON
    theirs[0x0131] = "Adobe Photoshop"
    theirs.get_ifd(0x8769)[0x9286] = b"ASCII\0\0\0" + json.dumps(settings).encode()
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", exif=theirs)
    assert read_settings(buf.getvalue()) is None
    damaged = PngImagePlugin.PngInfo()
    damaged.add_itxt("qwen-image-lora", '{"seed": 7,,}')
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=damaged)
    with pytest.raises(InputError, match="settings are damaged"):
        read_settings(buf.getvalue())


def test_the_settings_record_what_acted_not_what_was_left_out(tiny_pipe):
    gen = Generator(tiny_pipe, resolution=64)
    made = gen.describe(GenerationRequest(prompt="a", aspect_ratio="16:9", guidance_scale=4.0))
    # no steps given: the pipeline's own; guidance without a negative prompt does nothing, so 1.0 acted
    assert made["num_inference_steps"] == gen.default_steps and made["guidance_scale"] == 1.0
    assert (made["width"], made["height"], made["aspect_ratio"]) == (96, 64, None)  # the preset, as sampled
    assert made["model"] == {"pretrained": str(tiny_pipe.name_or_path), "revision": None, "dtype": "float32"}
    made = gen.describe(GenerationRequest(prompt="a", negative_prompt="blur"))
    assert made["guidance_scale"] == gen.default_guidance and (made["width"], made["height"]) == (64, 64)
    # an edit's size follows its input: recorded as given (null), so the same input gives it back
    edit = GenerationRequest(prompt="a", images=[Image.new("RGB", (80, 48))])
    assert (gen.describe(edit)["width"], gen.describe(edit)["height"]) == (None, None)


@pytest.fixture(scope="module")
def made(gen, tiny_model_dir, tmp_path_factory):
    """One image in each format from the same settings, with an adapter at 0.8 and a negative prompt."""
    root = tmp_path_factory.mktemp("made")
    make_random_lora(gen.pipe.transformer, root / "brand", seed=3)
    common = ["generate", "--model", str(tiny_model_dir), *TINY, "--prompt", "a bottle, Fläschchen", "--negative-prompt",
              "blurry", "--guidance-scale", "2.5", "--aspect-ratio", "16:9", "--steps", "2", "--seed", "3",
              "--lora", f"{root / 'brand'}:0.8"]  # fmt: skip
    for name in ("out.png", "out.webp", "out.jpg"):
        assert main([*common, "--output", str(root / "images" / name)]) == 0
    return root


def test_generate_writes_its_settings_into_png_webp_and_jpeg_and_prints_the_seed(made, tiny_model_dir, capsys):
    png, webp, jpg = (read_settings(made / "images" / n) for n in ("out.png", "out.webp", "out.jpg"))
    assert "quality" not in png and webp.pop("quality") == jpg.pop("quality") == 95  # a lossy file's encoding
    assert png == webp == jpg
    # no mask: the feather did not act (it was recorded as 8)
    assert {k: png[k] for k in ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width",
                                "height", "aspect_ratio", "resolution", "mask", "mask_feather")} == {
        "prompt": "a bottle, Fläschchen", "negative_prompt": "blurry", "seed": 3, "num_inference_steps": 2,
        "guidance_scale": 2.5, "width": 96, "height": 64, "aspect_ratio": None, "resolution": 64, "mask": None,
        "mask_feather": None}  # fmt: skip
    assert png["model"] == {"pretrained": str(tiny_model_dir), "revision": None, "dtype": "float32"}
    weights = made / "brand" / "pytorch_lora_weights.safetensors"
    assert png["loras"] == [{"name": "brand", "weight": 0.8, "sha256": sha256(weights), "path": "../brand"}]
    again = made / "again"
    again.mkdir()
    assert main(["generate", "--from", str(made / "images" / "out.webp"), "--output", str(again / "seed.png")]) == 0
    assert capsys.readouterr().out.strip() == f"{again / 'seed.png'} (seed 3)"


def test_generate_from_an_image_recreates_it_pixel_for_pixel_and_flags_override(made, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded adapter is found relative to the image
    out = made / "images" / "out.png"
    assert main(["generate", "--from", str(out), "--output", "again.png"]) == 0
    assert np.array_equal(pixels("again.png"), pixels(out))
    recorded = read_settings(out)
    moved = os.path.relpath(made / "brand", tmp_path)  # relative to the new image's folder
    assert read_settings("again.png") == {**recorded, "loras": [{**recorded["loras"][0], "path": moved}]}

    # a JPEG's settings re-create the PNG too; a flag given here wins over the image's
    assert main(["generate", "--from", str(made / "images" / "out.jpg"), "--seed", "4", "--output", "other.png"]) == 0
    assert read_settings("other.png")["seed"] == 4 and not np.array_equal(pixels("other.png"), pixels(out))
    assert {k: v for k, v in read_settings("other.png").items() if k not in ("seed", "loras")} == \
        {k: v for k, v in recorded.items() if k not in ("seed", "loras")}  # fmt: skip


def test_a_lora_given_without_a_weight_with_from_takes_the_weight_the_image_recorded(made, tmp_path, monkeypatch):
    """`--from out.png --lora PATH` rendered the recorded adapter at 1.0, not the 0.8 the image was made with."""
    monkeypatch.chdir(tmp_path)
    out = made / "images" / "out.png"
    assert main(["generate", "--from", str(out), "--lora", str(made / "brand"), "--output", "same.png"]) == 0
    assert read_settings("same.png")["loras"][0]["weight"] == 0.8 and np.array_equal(pixels("same.png"), pixels(out))
    assert main(["generate", "--from", str(out), "--lora", f"{made / 'brand'}:0.3", "--output", "given.png"]) == 0
    assert read_settings("given.png")["loras"][0]["weight"] == 0.3  # a weight given here wins


def test_from_names_every_adapter_it_cannot_use_and_says_those_a_given_lora_leaves_out(
    gen, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The error named the first adapter that was gone, and following its "give --lora" rendered without the
    other: exit 0, another image."""
    monkeypatch.chdir(tmp_path)
    make_random_lora(gen.pipe.transformer, tmp_path / "style", seed=5)
    make_random_lora(gen.pipe.transformer, tmp_path / "sku", seed=6)
    argv = ["generate", "--model", str(tiny_model_dir), *TINY, "--prompt", "a", "--steps", "2", "--lora", "style:0.5",
            "--lora", "sku:-1.0"]  # fmt: skip
    assert main([*argv, "--output", "two.png"]) == 0
    shutil.move(tmp_path / "sku", tmp_path / "moved")
    capsys.readouterr()
    assert main(["generate", "--from", "two.png", "--output", "again.png"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --from two.png: adapter 'sku': sku is not there any more; give --lora style:0.5 --lora PATH:-1.0"
    )
    assert main(["generate", "--from", "two.png", "--lora", "style", "--output", "one.png"]) == 0
    assert capsys.readouterr().err.strip() == (
        "note: --from two.png: the --lora given replace the adapters it was made with; left out: 'sku' at -1.0"
    )
    assert [(a["name"], a["weight"]) for a in read_settings("one.png")["loras"]] == [("style", 0.5)]
    assert main(["generate", "--from", "two.png", "--lora", "style", "--lora", "moved", "--output", "same.png"]) == 0
    assert capsys.readouterr().err == "" and np.array_equal(pixels("same.png"), pixels("two.png"))


def test_from_with_an_adapter_changed_since_names_its_file_and_a_lora_giving_it_keeps_its_weight(
    gen, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The fix said `--lora PATH:0.5` for a file it knew, and `--lora style` then rendered at 1.0 while the note
    called style "left out"."""
    monkeypatch.chdir(tmp_path)
    make_random_lora(gen.pipe.transformer, tmp_path / "style", seed=5)
    argv = ["generate", "--model", str(tiny_model_dir), *TINY, "--prompt", "a", "--steps", "1", "--lora", "style:0.5"]
    assert main([*argv, "--output", "one.png"]) == 0
    make_random_lora(gen.pipe.transformer, tmp_path / "style", seed=7)  # retrained in place
    capsys.readouterr()
    assert main(["generate", "--from", "one.png", "--output", "x.png"]) == 2
    assert capsys.readouterr().err.strip().endswith("has changed since the image was made (sha256 differs); give "
                                                    "--lora style:0.5")  # fmt: skip
    assert main(["generate", "--from", "one.png", "--lora", "style", "--output", "again.png"]) == 0
    assert capsys.readouterr().err.strip() == (
        "note: --from one.png: adapter 'style' has changed since the image was made (sha256 differs); style is used "
        "as it is"
    )
    assert [(a["name"], a["weight"]) for a in read_settings("again.png")["loras"]] == [("style", 0.5)]


def test_a_resolution_given_with_from_replaces_the_recorded_size(made, tmp_path, monkeypatch):
    """The recorded 96x64 would outrank data.resolution, leaving the size as it was while the file said 128."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--from", str(made / "images" / "out.png"), "--output", "big.png",
                 "data.resolution=128"]) == 0  # fmt: skip
    settings = read_settings("big.png")
    assert Image.open("big.png").size == (settings["width"], settings["height"]) == (128, 128)
    assert settings["resolution"] == 128 and settings["seed"] == 3  # the rest still comes from the image


def test_a_jpeg_from_its_own_settings_is_the_same_file_at_its_quality(made, tmp_path, monkeypatch):
    """The quality was not recorded: `--from` a quality-50 JPEG wrote it at 95 (max pixel difference 51)."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--from", str(made / "images" / "out.png"), "--quality", "50", "--output", "q50.jpg"]) == 0
    assert main(["generate", "--from", "q50.jpg", "--output", "again.jpg"]) == 0
    assert read_settings("again.jpg")["quality"] == 50 and np.array_equal(pixels("again.jpg"), pixels("q50.jpg"))
    assert main(["generate", "--from", "q50.jpg", "--quality", "90", "--output", "better.jpg"]) == 0
    assert read_settings("better.jpg")["quality"] == 90  # a flag given here wins


def test_from_checks_the_adapter_hash_and_names_itself_when_an_image_has_no_settings(made, gen, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    image = shutil.copy(made / "images" / "out.png", tmp_path / "images" / "out.png")
    argv = ["generate", "--from", str(image), "--output", str(tmp_path / "again.png")]
    assert main(argv) == 2  # no adapter at ../brand beside the copy
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err
        == f"error: --from {image}: adapter 'brand': {tmp_path / 'images' / '..' / 'brand'} is not there any more; give --lora PATH:0.8"
    )
    make_random_lora(gen.pipe.transformer, tmp_path / "brand", seed=4)  # retrained: same name, other weights
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --from {image}: adapter 'brand': ") and "has changed since the image was made" in err
    assert not (tmp_path / "again.png").exists()

    Image.new("RGB", (32, 32)).save(tmp_path / "plain.png")
    assert main(["generate", "--from", str(tmp_path / "plain.png"), "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: --from {tmp_path / 'plain.png'}: it carries no qwen-image-lora settings (--from takes an "
                   "image written by generate, edit, batch or the API)")  # fmt: skip


def test_edit_from_uses_the_recorded_inputs_while_they_keep_their_hash(tiny_model_dir, tmp_path, capsys):
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (48, 80, 3), dtype=np.uint8)).save(src)
    ones = np.zeros((48, 80), np.uint8)
    ones[:, 40:] = 255
    Image.fromarray(ones).save(mask)
    (tmp_path / "out").mkdir()
    edited = tmp_path / "out" / "edited.png"
    assert main(["edit", "--model", str(tiny_model_dir), *TINY, "--image", str(src), "--mask", str(mask),
                 "--mask-feather", "3", "--prompt", "on marble", "--steps", "2", "--output", str(edited)]) == 0  # fmt: skip
    recorded = read_settings(edited)
    assert recorded["images"] == [{"sha256": sha256(src), "path": "../src.png"}]
    assert recorded["mask"] == {"sha256": sha256(mask), "path": "../mask.png"} and recorded["mask_feather"] == 3
    assert main(["edit", "--from", str(edited), "--output", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(edited))

    capsys.readouterr()
    assert main(["generate", "--from", str(edited), "--output", str(tmp_path / "x.png")]) == 2
    assert f"re-create it with `qwen-lora edit --from {edited}`" in capsys.readouterr().err
    Image.new("RGB", (80, 48), "red").save(src)  # the input changed since
    assert main(["edit", "--from", str(edited), "--output", str(tmp_path / "x.png")]) == 2
    assert "input image 1" in (err := capsys.readouterr().err) and "has changed" in err and "give --image" in err
    t2i = tmp_path / "t2i.png"
    assert (
        main(["generate", "--model", str(tiny_model_dir), *TINY, "--prompt", "a", "--steps", "1", "--output", str(t2i)])
        == 0
    )
    capsys.readouterr()
    assert main(["edit", "--from", str(t2i), "--output", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == (  # it named --image, as if the image had been given there
        f"error: --from {t2i}: it was made from text alone; give --image for the images to edit"
    )


def test_batch_outputs_and_an_api_response_carry_the_same_settings_block(gen, tiny_model_dir, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.RandomState(2).randint(0, 255, (48, 80, 3), dtype=np.uint8)).save(src)
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"id": "t2i", "prompt": "a mug", "seed": 5, "num_inference_steps": 1, "aspect_ratio": "16:9"},
             {"id": "edit", "prompt": "on marble", "seed": 5, "num_inference_steps": 1, "images": ["in.png"],
              "output": "edit.webp"}]  # fmt: skip
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_batch(gen, read_jobs(jobs), tmp_path / "out", progress=False)
    assert result.written == ["t2i", "edit"]
    batch_t2i, batch_edit = read_settings(tmp_path / "out" / "t2i.png"), read_settings(tmp_path / "out" / "edit.webp")
    assert batch_edit["images"] == [{"sha256": sha256(src), "path": "../in.png"}]

    cfg = Config()
    cfg.model.pretrained, cfg.data.resolution, cfg.serve.max_steps = str(tiny_model_dir), 64, 4
    with TestClient(create_app(cfg, [KEY], generator=gen)) as client:
        r = client.post("/v1/images", json={k: v for k, v in lines[0].items() if k != "id"}, headers={"x-api-key": KEY})
        assert r.status_code == 200, r.text
        # the same block, byte for byte in meaning, but for the model folder: its name alone (it was the server's
        # absolute path, in every image and b64_json response a client got)
        served_t2i = read_settings(r.content)
        assert served_t2i == {**batch_t2i, "model": {**batch_t2i["model"], "pretrained": tiny_model_dir.name}}
        assert batch_t2i["model"]["pretrained"] == str(tiny_model_dir)
        assert str(tiny_model_dir).encode() not in r.content
        edit = {"prompt": "on marble", "seed": 5, "num_inference_steps": 1, "image": base64.b64encode(src.read_bytes()).decode(),
                "output_format": "webp", "response_format": "b64_json"}  # fmt: skip
        r = client.post("/v1/images", json=edit, headers={"x-api-key": KEY})
        assert r.status_code == 200, r.text
    served = r.json()["data"][0]
    assert read_settings(base64.b64decode(served["b64_json"])) == served["settings"]
    # the API knows the input only by its bytes: the same sha256, no path
    assert served["settings"] == {**batch_edit, "images": [{"sha256": sha256(src), "path": None}],
                                  "model": served_t2i["model"]}  # fmt: skip
    assert str(tiny_model_dir.parent) not in r.text


def test_from_an_api_image_asks_for_the_model_it_names_by_folder_name_alone(gen, tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    """An API image names a local model folder by its name: `--from` looked it up on the hub ("hf download tiny-...")
    or took a folder of that name in the working folder without a word."""
    cfg = Config()
    cfg.model.pretrained, cfg.data.resolution, cfg.serve.max_steps = str(tiny_model_dir), 64, 4
    with TestClient(create_app(cfg, [KEY], generator=gen)) as client:
        r = client.post("/v1/images", json={"prompt": "a mug", "seed": 5, "num_inference_steps": 1},
                        headers={"x-api-key": KEY})  # fmt: skip
    (tmp_path / "api.png").write_bytes(r.content)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--from", "api.png", "--output", "again.png"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --from api.png: it names its model by a folder name alone, '{tiny_model_dir.name}' (an image made by "
        "`qwen-lora serve`, which keeps the server's path to itself); give --model PATH"
    )
    shutil.copytree(tiny_model_dir, tmp_path / tiny_model_dir.name)  # a folder of that name here: taken, and said
    assert main(["generate", "--from", "api.png", "--output", "again.png"]) == 0
    assert f"using ./{tiny_model_dir.name} (give --model PATH for another)" in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open("again.png")), np.asarray(Image.open("api.png")))


def test_a_recorded_quality_out_of_range_is_named_with_the_image(made, tmp_path, capsys):
    settings = read_settings(made / "images" / "out.png") | {"quality": 101}
    odd = made / "images" / "odd.png"  # beside the original: its adapter's recorded path still holds
    odd.write_bytes(encode_image(Image.open(made / "images" / "out.png"), "png", settings=settings))
    try:
        assert main(["generate", "--from", str(odd), "--output", str(tmp_path / "a.jpg")]) == 2
    finally:
        odd.unlink()
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"error: --from {odd}: its quality: must be a number from 1 to 100 (got 101); give --quality"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_jpeg_of_an_image_with_alpha_is_composited_on_white_at_the_quality_asked(mode):
    """JPEG has no alpha: a transparent pixel is white (PIL would refuse LA and P, and drop RGBA's alpha to black)."""
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (8, 8, 24, 24))
    image = rgba.convert(mode) if mode != "P" else rgba.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P":
        image.info["transparency"] = image.getpixel((0, 0))
    best, worst = (encode_image(image, "jpeg", quality) for quality in (95, 10))
    pixels = np.asarray(Image.open(io.BytesIO(best)).convert("RGB"), dtype=int)
    assert np.abs(pixels[0, 0] - 255).max() <= 2  # transparent: white
    centre = (200, 30, 30) if mode != "LA" else (81, 81, 81)  # LA keeps its luminance: .299 R + .587 G + .114 B
    assert np.abs(pixels[16, 16] - centre).max() <= 8
    assert len(worst) < len(best)  # the quality is applied, to WebP too
    assert len(encode_image(rgba, "webp", 10)) < len(encode_image(rgba, "webp", 95))


def test_a_webp_at_quality_100_is_lossless_pixels_and_alpha_alike():
    """Lossy WebP halves chroma at any quality: a masked edit's kept pixels moved by up to 98 levels at quality 100,
    so a designer had no WebP that keeps them; 100 is now lossless (colour under transparency included)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 40, 4), dtype=np.uint8)
    pixels[:8, :, 3] = 0  # transparent rows keep their colour too
    image = Image.fromarray(pixels, "RGBA")
    settings = {"seed": 3}
    data = encode_image(image, "webp", 100, settings)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")), pixels)
    assert read_settings(data) == settings | {"quality": 100}
    lossy = np.asarray(Image.open(io.BytesIO(encode_image(image, "webp", 99))).convert("RGBA")).astype(int)
    assert np.abs(lossy - pixels).max() > 8  # 99 stays lossy


@pytest.mark.parametrize("quality", [0, 101, 500, 95.5, True, "90"])
def test_a_quality_outside_1_to_100_is_refused_naming_it(quality):
    """Every edge refuses it; `save_image(..., quality=500)` wrote a file."""
    with pytest.raises(SettingError, match=r"^quality: must be a whole number from 1 to 100 \(got "):
        encode_image(Image.new("RGB", (8, 8)), "jpeg", quality)
    for fine in (1, 100, np.int64(50)):
        encode_image(Image.new("RGB", (8, 8)), "webp", fine)


def test_other_text_chunks_of_a_png_carry_no_settings_block():
    """layers' flattened PNG carries its mark alone: `--from` it would re-create its background edit only."""
    data = encode_image(Image.new("RGBA", (8, 8)), "png", png_text={"mark": "sku.psd"})
    assert read_settings(data) is None and read_png_text(data, "mark") == "sku.psd"
    both = encode_image(Image.new("RGBA", (8, 8)), "png", settings={"seed": 1}, png_text={"mark": "sku.psd"})
    assert read_settings(both) == {"seed": 1} and read_png_text(both, "mark") == "sku.psd"
