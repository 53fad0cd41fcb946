"""Layered output: subject cut-out, background, generated elements; PSD / OpenRaster / ZIP that reopen as written."""

import io
import json
import zipfile
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image, ImageDraw
from psd_tools import PSDImage
from psd_tools.constants import Resource
from scipy.ndimage import distance_transform_edt

from qwen_image_lora.cli import main
from qwen_image_lora.image_files import SRGB_ICC, read_settings, save_image
from qwen_image_lora.inference import layers as layer_output
from qwen_image_lora.inference import mask_rules, masking
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.inference.layers import FLATTENED_KEY
from tests.test_inference_masking import random_mask
from tests.unchosen import unchosen_seeds

W, H = 160, 96


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=96)


@pytest.fixture(scope="module")
def made(gen):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((H, W), np.uint8)
    mask[20:80, 40:120] = 255  # the product
    mask = Image.fromarray(mask, "L")
    request = GenerationRequest("x", images=[image], num_inference_steps=2, seed=5, mask_feather=3)
    elements = [layer_output.Element.parse("a red SALE badge@24,8,64,32")]  # left != top: PSD takes (top, left)
    return image, mask, gen.layers(request, mask, "a marble table", elements)


def test_layers_are_the_subject_cut_out_the_background_and_the_elements(made):
    image, mask, result = made
    names = [layer.name for layer in result.layers]
    assert names[:2] == ["background", "subject"] and names[2].startswith("element 1: a red SALE badge")
    subject = result.layers[1].image
    assert np.array_equal(np.asarray(subject)[..., :3], np.asarray(image))  # the input's own colour
    assert np.array_equal(np.asarray(subject.getchannel("A")), np.asarray(mask))  # the mask as alpha
    element = result.layers[2]
    assert (element.left, element.top, element.image.size) == (24, 8, (64, 32))
    background = np.asarray(result.layers[0].image.convert("RGB")).astype(int)
    inside = np.asarray(mask) > 0
    far = distance_transform_edt(~inside) > 3  # beyond the feather's reach of the subject
    assert np.array_equal(background[far], np.asarray(image)[far])  # a masked edit: only the hole changed
    assert np.abs(background[inside] - np.asarray(image)[inside]).mean() > 5


@pytest.mark.parametrize("seed", [*range(4), *unchosen_seeds(2)])
def test_the_subject_is_the_mask_exactly_and_the_background_keeps_none_of_it(gen, monkeypatch, seed):
    """The subject's alpha was the mask shrunk and blurred by the feather, and the background kept the original's
    pixels under the feather band and the soft edge: moving the subject revealed a second one."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(64, 160)), int(rng.integers(64, 128))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    mask, feather = random_mask(rng, size, soft=seed % 2 == 1), int(rng.integers(1, 13))
    generated = []
    real_composite = masking.composite

    def recording(result, original, edit_mask, mask_feather):  # our own function: keeps the model's raw output
        generated.append(result.resize(original.size, Image.Resampling.LANCZOS).convert("RGB"))
        return real_composite(result, original, edit_mask, mask_feather)

    monkeypatch.setattr(masking, "composite", recording)
    request = GenerationRequest("x", images=[image], num_inference_steps=1, seed=seed, mask_feather=feather)
    background, subject = gen.layers(request, mask).layers
    assert np.array_equal(np.asarray(subject.image.getchannel("A")), np.asarray(mask))  # soft edges included
    assert np.array_equal(np.asarray(subject.image.convert("RGB")), np.asarray(image))
    inside = np.asarray(mask) > 0
    got, made = np.asarray(background.image.convert("RGB")), np.asarray(generated[0])
    assert np.array_equal(got[inside], made[inside])  # every pixel under the subject is the inpainted one
    far = distance_transform_edt(~inside) > feather  # the edit grows only as far as the blend needs
    assert np.array_equal(got[far], np.asarray(image)[far])


def test_psd_reopens_with_named_layers_at_their_offsets(made, tmp_path):
    _, _, result = made
    psd_path, flat_path = layer_output.save_layers(result, tmp_path / "out.psd")
    psd = PSDImage.open(psd_path)
    assert psd.size == (W, H)
    assert psd.image_resources.get_data(Resource.ICC_PROFILE) == SRGB_ICC  # tagged as the flat file is
    reopened = list(psd)
    assert [layer.name for layer in reopened] == [layer.name for layer in result.layers]
    for ours, theirs in zip(result.layers, reopened, strict=True):
        assert (theirs.left, theirs.top) == (ours.left, ours.top)
        back = theirs.topil().convert("RGBA")
        # The PSD may crop fully transparent borders: compare over the layer's stored box.
        box = (theirs.left - ours.left, theirs.top - ours.top)
        crop = ours.image.convert("RGBA").crop((*box, box[0] + back.width, box[1] + back.height))
        assert np.array_equal(np.asarray(back), np.asarray(crop)), theirs.name
    # The flattened file is the layers composited in order.
    flat = np.asarray(Image.open(flat_path))
    manual = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    for theirs in reopened:
        manual.alpha_composite(theirs.topil().convert("RGBA"), (theirs.left, theirs.top))
    assert np.array_equal(flat, np.asarray(manual))
    # The merged image inside the PSD (what Pillow, thumbnailers and asset managers read) is the flattened one; its
    # alpha was 0 everywhere, so they showed nothing.
    merged = np.asarray(Image.open(psd_path)).astype(int)
    assert merged.shape == flat.shape and np.array_equal(merged[..., 3], flat[..., 3])
    assert np.abs(merged[..., :3] - flat[..., :3]).max() <= 1  # psd-tools composites in float


def test_openraster_and_zip_outputs(made, tmp_path):
    _, _, result = made
    ora, _ = layer_output.save_layers(result, tmp_path / "out.ora")
    with zipfile.ZipFile(ora) as z:
        first = z.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
        assert z.read("mimetype") == b"image/openraster"
        stack = ElementTree.fromstring(z.read("stack.xml"))
        assert [e.get("name") for e in stack.iter("layer")] == [layer.name for layer in reversed(result.layers)]
    archive, flat = layer_output.save_layers(result, tmp_path / "other.zip")  # out.png is out.ora's
    with zipfile.ZipFile(archive) as z:
        index = json.loads(z.read("layers.json"))
        assert [entry["name"] for entry in index["layers"]] == [layer.name for layer in result.layers]
        assert index["layers"][2] | {"file": None} == {
            "file": None,
            "name": result.layers[2].name,
            "left": 24,
            "top": 8,
            "width": 64,
            "height": 32,
        }
        assert np.array_equal(np.asarray(Image.open(z.open("composite.png"))), np.asarray(Image.open(flat)))


def _unicode_named_layers() -> layer_output.Layers:
    rng = np.random.default_rng(4)
    layers = [
        layer_output.Layer(name, Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), "RGBA"), 8 * i, i)
        for i, name in enumerate(["background", "中文 标志", "SALE 🎉", "crème brûlée"])
    ]
    return layer_output.Layers((W, H), layers)


def test_psd_keeps_layer_names_mac_roman_cannot_encode(tmp_path):
    """A Chinese or emoji element prompt raised UnicodeEncodeError after all the rendering: the legacy layer name is
    Mac Roman. Photoshop reads the Unicode name; PIL reads only the legacy one, so its opening the file checks it."""
    result = _unicode_named_layers()
    psd_path, _ = layer_output.save_layers(result, tmp_path / "out.psd")
    assert [layer.name for layer in PSDImage.open(psd_path)] == [layer.name for layer in result.layers]
    with Image.open(psd_path) as flat:
        assert len(flat.layers) == len(result.layers)


def test_control_characters_in_an_element_prompt_leave_every_format_readable(tmp_path):
    """A prompt with NUL, ESC or a tab named its layer as it was: the .ora's stack.xml was not well-formed XML."""
    image = Image.new("RGBA", (8, 8), (200, 0, 0, 255))
    layers = layer_output.Layers((W, H), [layer_output.Layer("element 1: bad\x00name\x1b[31m\tred\ufffe", image)])
    with zipfile.ZipFile(io.BytesIO(layer_output.encode_layers(layers, "ora"))) as z:
        (name,) = [e.get("name") for e in ElementTree.fromstring(z.read("stack.xml")).iter("layer")]
    assert name == "element 1: bad name [31m red "
    psd_path, _ = layer_output.save_layers(layers, tmp_path / "out.psd")
    assert [layer.name for layer in PSDImage.open(psd_path)] == [name]


@pytest.mark.parametrize("fmt", ["ora", "zip"])
def test_archive_entries_unzip_readable_by_everyone_and_tagged_srgb(fmt):
    """Entries written under a bare name unzipped as -rw------- (0600); their PNGs were untagged."""
    with zipfile.ZipFile(io.BytesIO(layer_output.encode_layers(_unicode_named_layers(), fmt))) as z:
        modes = {info.filename: oct(info.external_attr >> 16 & 0o777) for info in z.infolist()}
        pngs = [Image.open(io.BytesIO(z.read(name))) for name in z.namelist() if name.endswith(".png")]
    assert set(modes.values()) == {"0o644"}, modes
    if fmt == "zip":  # a Chinese or accented name was cut to its ASCII letters ("01_.png"), emoji and "/" drop
        assert sorted(modes)[:4] == ["00_background.png", "01_中文_标志.png", "02_sale.png", "03_crème_brûlée.png"]
    assert pngs and all(png.info.get("icc_profile") == SRGB_ICC for png in pngs)


def test_bad_layer_requests_are_refused_naming_the_part(gen):
    with pytest.raises(layer_output.LayersError, match="PROMPT@x,y,w,h"):
        layer_output.Element.parse("a badge at the top")
    image = Image.new("RGB", (W, H))
    request = GenerationRequest("x", images=[image], num_inference_steps=1)
    with pytest.raises(layer_output.LayersError, match="leaves the 160x96 image"):
        gen.layers(request, random_mask(np.random.default_rng(0), (W, H)),
                   elements=[layer_output.Element.parse("b@150,0,32,32")])  # fmt: skip
    with pytest.raises(layer_output.LayersError, match="use .psd, .ora or .zip"):
        layer_output.save_layers(layer_output.Layers((W, H)), "out.tiff")
    # A layers mask is white on the subject: its refusals said "changes nothing ... paint white where the image may
    # change" and, for an all-white one, warned of "a plain edit (nothing is kept)".
    with pytest.raises(
        mask_rules.MaskError, match=r"^mask: no subject \(it is black everywhere\); paint the subject white"
    ):
        gen.layers(request, Image.new("L", (W, H), 0))
    with pytest.raises(
        mask_rules.MaskError, match=r"^mask: the subject covers the whole image \(white everywhere\), so no"
    ):
        gen.layers(request, Image.new("L", (W, H), 255))


def test_an_element_renders_at_its_boxs_aspect(gen, monkeypatch):
    """Each side of a box was rounded to the 32-px grid on its own: a 10x40 badge rendered square and was squeezed
    4x into its box, a 48x16 one at 2:1 into 3:1."""
    sizes, real_generate = [], gen.generate

    def recording(request):  # our own method: records the size each element was rendered at
        made = real_generate(request)
        if not request.images:
            sizes.append(made.size)
        return made

    monkeypatch.setattr(gen, "generate", recording)
    boxes = [(5, 5, 10, 40), (0, 0, 48, 16), (2, 60, 150, 20)]
    request = GenerationRequest("x", images=[Image.new("RGB", (W, H))], num_inference_steps=1)
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (40, 20, 120, 80))
    result = gen.layers(
        request, mask, elements=[layer_output.Element.parse(f"b@{x},{y},{w},{h}") for x, y, w, h in boxes]
    )
    for (_, _, w, h), (rw, rh), layer in zip(boxes, sizes, result.layers[2:], strict=True):
        # Each side on the 32-px grid moves the aspect by at most 32 / the short side; `ImageOps.fit` crops that off.
        assert abs((rw / rh) / (w / h) - 1) <= 32 / min(rw, rh), ((w, h), (rw, rh))
        assert rw * rh >= 0.5 * 96 * 96 and layer.image.size == (w, h)  # at the model's pixel budget


def test_an_element_too_long_for_the_pixel_budget_renders_within_the_largest_side():
    """A 4096x1 strip at resolution 1024 is 65536 px long at the budget: past what the pipeline renders (4096)."""
    for box, resolution in (((4096, 1), 1024), ((1, 4096), 1024), ((40, 10), 64)):
        width, height = layer_output._element_size(*box, resolution)
        assert 32 <= min(width, height) and max(width, height) <= 4096 and width % 32 == height % 32 == 0
        assert (width > height) == (box[0] > box[1])


def test_an_element_is_scaled_into_its_box_not_stretched(gen, monkeypatch):
    """The render's aspect is the box's only to the 32-px grid (160x64 for a 48x16 box at resolution 96): it is
    cropped to the box's aspect, then scaled, so a round badge stays round."""
    real_generate = gen.generate

    def round_badge(request):  # our own method: an element comes back as a disc centred in its render
        if request.images:
            return real_generate(request)
        badge = Image.new("RGBA", (request.width, request.height), (0, 0, 0, 0))
        r, (cx, cy) = min(request.width, request.height) // 3, (request.width // 2, request.height // 2)
        ImageDraw.Draw(badge).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 0, 0, 255))
        return badge

    monkeypatch.setattr(gen, "generate", round_badge)
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (40, 20, 120, 80))
    request = GenerationRequest("x", images=[Image.new("RGB", (W, H))], num_inference_steps=1)
    (element,) = gen.layers(request, mask, elements=[layer_output.Element.parse("b@0,0,96,32")]).layers[2:]
    alpha = np.asarray(element.image.getchannel("A")) > 127
    across, down = alpha.any(axis=0).sum(), alpha.any(axis=1).sum()
    assert abs(int(across) - int(down)) <= 1, (across, down)


def test_a_subject_grown_over_the_whole_image_says_so_in_layers_terms(gen, caplog):
    """The masked edit's "white everywhere, so this is a plain edit" spoke of a mask the user had not drawn."""
    mask = Image.new("L", (W, H), 255)
    mask.paste(0, (0, 0, W, 4))  # black only in a strip the feather covers
    request = GenerationRequest("x", images=[Image.new("RGB", (W, H))], num_inference_steps=1, mask_feather=8)
    with caplog.at_level("WARNING"):
        background = gen.layers(request, mask).layers[0]
    assert "layers: the subject grown by mask_feather=8 px covers the whole image" in caplog.text
    assert "white everywhere" not in caplog.text and background.image.size == (W, H)


def test_auto_mask_is_the_alpha_of_the_models_own_cut_out(gen):
    image = Image.new("RGB", (W, H), (120, 60, 30))
    request = GenerationRequest("x", images=[image], num_inference_steps=1, seed=2)
    cutout = gen.generate(
        GenerationRequest(layer_output.AUTO_MASK_PROMPT, images=[image], num_inference_steps=1, seed=2)
    )
    assert cutout.mode == "RGBA"
    assert np.array_equal(np.asarray(layer_output._auto_mask(gen, request)), np.asarray(cutout.getchannel("A")))


def test_layers_command_writes_a_psd_and_the_flat_image_and_says_the_seed(tiny_model_dir, tmp_path, capsys):
    """Like generate, it says the seed it used. The flattened PNG carries no settings block: `--from` would
    re-create its background edit alone, not the layered image."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (40, 20, 120, 80))
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.psd"
    argv = [
        "layers",
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "data.resolution=96",
        "--steps",
        "1",
        "--image",
        str(tmp_path / "in.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--element",
        "a badge@0,0,32,32",
        "--output",
        str(out),
    ]
    assert main([*argv, "--seed", "7"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{out} (seed 7)", f"{tmp_path / 'out.png'} (seed 7)"]
    psd = PSDImage.open(out)
    assert [layer.name for layer in psd][:2] == ["background", "subject"] and len(list(psd)) == 3
    assert Image.open(tmp_path / "out.png").size == (W, H)
    assert read_settings(tmp_path / "out.png") is None
    assert main([*argv[:-4], "--element", "no box here", "--output", str(out)]) == 2  # refused before loading
    capsys.readouterr()
    assert main([*argv, "--seed", "8"]) == 0  # its own flattened image, from the run before: replaced
    assert capsys.readouterr().out.splitlines()[-1] == f"{tmp_path / 'out.png'} (seed 8)"


@pytest.mark.parametrize("seed", range(3))
def test_layers_refuses_a_bad_mask_or_element_box_before_loading_the_model(tmp_path, capsys, seed, unloadable_model):
    """The model folder is empty, so loading it would fail naming model.pretrained: an error naming --mask or
    --element proves the check came first (these used to come after the model had loaded)."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(48, 400)), int(rng.integers(48, 400))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    random_mask(rng, (w, h)).save(tmp_path / "good.png")
    Image.new("L", (w, int(h * rng.uniform(1.1, 2))), 255).save(tmp_path / "aspect.png")
    Image.new("L", (w, h), int(rng.integers(0, 128))).save(tmp_path / "black.png")
    x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
    outside = f"a badge@{x},{y},{w - x + int(rng.integers(1, 40))},{int(rng.integers(1, h - y + 1))}"
    (tmp_path / "o.png").mkdir(exist_ok=True)  # a folder where the flattened image goes: a traceback after the render
    cases = [("good.png", [], "could not write", "o.png: a folder is where the file should be"), ("aspect.png", [], "--mask", "aspect ratio"),
             ("black.png", [], "--mask", "no subject"),
             ("good.png", ["--element", outside], "--element", f"leaves the {w}x{h} image"),
             ("auto", ["--element", outside], "--element", f"leaves the {w}x{h} image"),
             # a user's own PNG where the flattened image goes was overwritten without a word
             ("good.png", [], "--output", f"{tmp_path / 'mine.png'} exists and is not a flattened image of layers")]  # fmt: skip
    (tmp_path / "in.png").replace(tmp_path / "mine.png")  # not an input: a file of the user's
    (tmp_path / "in.png").write_bytes(kept := (tmp_path / "mine.png").read_bytes())
    for i, (mask, extra, option, message) in enumerate(cases):
        out = tmp_path / ("o.psd" if i == 0 else "mine.psd" if i == len(cases) - 1 else "p.psd")
        rc = main(
            [
                "layers",
                "--model",
                str(unloadable_model),
                "--image",
                str(tmp_path / "in.png"),
                "--mask",
                mask if mask == "auto" else str(tmp_path / mask),
                *extra,
                "--output",
                str(out),
            ]
        )
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1, errors
        assert errors[0].startswith(f"error: {option}") and message in errors[0], errors[0]
    assert (tmp_path / "mine.png").read_bytes() == kept


def test_layers_says_what_acts_on_nothing_before_the_model_loads(tmp_path, capsys, unloadable_model):
    """generate and edit give a note before loading; layers said it after the model had loaded, in a bare log line."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    argv = ["layers", "--model", str(unloadable_model), "--image", str(tmp_path / "in.png"), "--mask", "auto",
            "--output", str(tmp_path / "o.psd")]  # fmt: skip
    for extra, note in (
        (["--guidance-scale", "3"], "--guidance-scale acts only with --negative-prompt"),
        (["--negative-prompt", "blur"], "--negative-prompt acts only with a --guidance-scale above 1"),
    ):
        assert main([*argv, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[0].startswith(f"note: {note}") and lines[-1].startswith("error: ") and len(lines) == 2, lines


def test_a_layered_file_layers_did_not_write_is_kept(tmp_path, capsys, unloadable_model):
    """A designer's retouched PSD (or a ZIP of theirs) at --output was overwritten without a word: only the flattened
    <name>.png beside it was checked. Refused before the model loads; an empty file (a write cut short) is not."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    with zipfile.ZipFile(tmp_path / "sku.zip", "w") as z:
        z.writestr("contract.txt", "theirs")
    (tmp_path / "sku.psd").write_bytes(b"8BPS" + bytes(40))
    for out in ("sku.psd", "sku.zip"):
        kept = (tmp_path / out).read_bytes()
        argv = ["layers", "--model", str(unloadable_model), "--image", str(tmp_path / "in.png"), "--mask", "auto",
                "--output", str(tmp_path / out)]  # fmt: skip
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --output: {tmp_path / out} exists and was not written by layers (no flattened sku.png beside it "
            "names it), so it is kept; move it or choose another output name"
        )
        assert (tmp_path / out).read_bytes() == kept
    (tmp_path / "empty.ora").touch()
    assert main([*argv[:-1], str(tmp_path / "empty.ora")]) == 2  # got past the check: the model is what fails
    assert "model" in capsys.readouterr().err


def test_a_second_layered_file_of_the_same_stem_does_not_take_the_first_ones_flattened_image(
    tmp_path, capsys, unloadable_model
):
    """`--output sku.zip` after `--output sku.psd` replaced sku.png, the PSD's flattened image, with another render;
    the PSD was then refused as "not written by layers". Refused before the model loads while the first file is
    there."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    (tmp_path / "sku.psd").write_bytes(b"8BPS" + bytes(40))
    save_image(Image.new("RGB", (64, 64)), tmp_path / "sku.png", png_text={FLATTENED_KEY: "sku.psd"})
    flat = (tmp_path / "sku.png").read_bytes()
    argv = ["layers", "--model", str(unloadable_model), "--image", str(tmp_path / "in.png"), "--mask", "auto",
            "--output", str(tmp_path / "sku.zip")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output: {tmp_path / 'sku.png'} is the flattened image of {tmp_path / 'sku.psd'}, and sku.zip would "
        "replace it (both flatten to sku.png); choose another output name"
    )
    assert (tmp_path / "sku.png").read_bytes() == flat
    (tmp_path / "sku.psd").unlink()  # the file it flattened is gone: the image is ours to replace
    assert main(argv) == 2 and "model" in capsys.readouterr().err
    # sku.psd there, its flattened image deleted: sku.zip took sku.png, and sku.psd could not be written again
    (tmp_path / "sku.psd").write_bytes(b"8BPS" + bytes(40))
    (tmp_path / "sku.png").unlink()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output: {tmp_path / 'sku.psd'} is there, and sku.zip would flatten to the same sku.png; choose "
        "another output name"
    )


def test_an_element_outside_the_limits_is_refused_naming_the_limit_and_the_option(tmp_path, capsys, unloadable_model):
    """`badge@0,0,0,10` was refused with 'write it as PROMPT@x,y,w,h', the format it is written in; the HTTP API
    names the limit (x, y >= 0; width, height >= 1)."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    base = ["layers", "--model", str(unloadable_model), "--image", str(tmp_path / "in.png"), "--mask", "auto",
            "--output", str(tmp_path / "o.psd")]  # fmt: skip
    for element, message in [("badge@0,0,0,10", "width must be >= 1 (got 0)"),
                             ("badge@-5,0,10,10", "x must be >= 0 (got -5)"),
                             ("badge@0,-1,10,10", "y must be >= 0 (got -1)"),
                             ("badge@0,0,10,0", "height must be >= 1 (got 0)"),
                             ("badge@0,0,10", "write it as PROMPT@x,y,w,h")]:  # fmt: skip
        assert main([*base, "--element", element]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line == f"error: --element {element!r}: {message}" or (
            message.startswith("write") and line.startswith(f"error: --element {element!r}: {message}")
        ), line
    assert layer_output.Element.parse("a sign @ the door@1,2,3,4") == layer_output.Element(
        "a sign @ the door", (1, 2, 3, 4)
    )
