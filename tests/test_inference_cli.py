"""The `qwen-lora generate | edit | batch` entry points on the tiny model: formats, adapters, resume, sharding."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from qwen_image_lora import run_layout as layout
from qwen_image_lora.cli import build_parser, main
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import read_settings
from qwen_image_lora.inference import batch, layers
from qwen_image_lora.inference.cli import _model_source
from qwen_image_lora.inference.jobs import read_jobs
from qwen_image_lora.inference.testing import make_random_lora
from qwen_image_lora.knobs import DEFAULT_BACKGROUND_PROMPT, parse_lora_arg
from qwen_image_lora.train import early
from tests.launch import accelerate_launch

TINY = ["--dtype", "float32", "data.resolution=64"]  # one name for the pixel budget, as in training


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    from diffusers import QwenImage21Transformer2DModel

    transformer = QwenImage21Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    return make_random_lora(transformer, tmp_path_factory.mktemp("cli") / "brand", seed=3)


def test_generate_and_edit_write_the_format_the_extension_names(tiny_model_dir, lora_dir, tmp_path):
    base, styled = tmp_path / "base.png", tmp_path / "styled.webp"
    common = ["--model", str(tiny_model_dir), *TINY, "--prompt", "a bottle", "--steps", "2", "--seed", "0"]
    assert main(["generate", *common, "--width", "96", "--height", "64", "--output", str(base)]) == 0
    assert (
        main(["generate", *common, "--aspect-ratio", "16:9", "--lora", f"{lora_dir}:0.8", "--output", str(styled)]) == 0
    )
    with Image.open(base) as im:
        assert im.format == "PNG" and im.mode == "RGBA" and im.size == (96, 64)
    with Image.open(styled) as im:
        assert im.format == "WEBP" and im.mode == "RGBA" and im.size[0] > im.size[1]

    src = tmp_path / "src.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (70, 100, 3), dtype=np.uint8)).save(src)
    edited = tmp_path / "edited.jpg"
    argv = ["edit", *common, "--image", str(src), "--image", str(base), "--output", str(edited), "--quality", "80"]
    assert main(argv) == 0
    with Image.open(edited) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (96, 64)  # the last input's size


def test_bad_arguments_fail_before_the_model_loads(tmp_path, unloadable_model, capsys):
    assert (
        main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--output", str(tmp_path / "o.gif")])
        == 2
    )
    assert "use .png, .jpg/.jpeg or .webp" in capsys.readouterr().err
    base = ["--model", str(unloadable_model), "--output", str(tmp_path / "o.png")]
    strip, big = tmp_path / "strip.png", tmp_path / "big.png"
    Image.new("RGB", (400, 20)).save(strip)
    Image.new("1", (8200, 8200)).save(big)  # 67.2 M pixels: over the limit, a few KB on disk
    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (2048, 12)).save(sliver)  # sized to 13376x64 at 1024: 209:1, over the image encoder's 200:1
    square = tmp_path / "square.png"
    Image.new("RGB", (64, 64), "white").save(square)
    masked = ["edit", "--prompt", "x", "--image", str(square), "--mask", str(square)]
    for argv, message in (
        (
            ["generate", "--prompt", "x", "--width", "100"],
            "--width: must be a positive multiple of 32 up to 4096 (got 100)",
        ),
        (["generate", "--prompt", "x", "--steps", "0"], "--steps: must be >= 1 and <= 1000 (got 0)"),
        (  # was a numpy traceback from the scheduler, after the model loaded
            ["generate", "--prompt", "x", "--steps", "99999999999999999999"],
            "--steps: must be >= 1 and <= 1000 (got 99999999999999999999)",
        ),
        (["generate", "--prompt", "x", "--guidance-scale", "1e300"], "--guidance-scale: must be >= 0.0 and <= 100.0"),
        (["generate", "--prompt", "x", "--guidance-scale", "nan"], "--guidance-scale: must be a finite"),
        # Was a math range error traceback from the scheduler (and NaN sigmas from ~12000 px).
        (
            ["generate", "--prompt", "x", "--width", "100032", "--height", "64"],
            "error: --width: must be a positive multiple of 32 up to 4096 (got 100032)",
        ),
        (
            ["generate", "--prompt", "x", "--aspect-ratio", "1:1", "--height", "64"],
            "error: --aspect-ratio: give it or --width/--height, not both",
        ),
        (
            ["edit", "--prompt", "x", *["--image", str(strip)] * 11],
            "error: --image: give 1 to 10 input images (got 11)",
        ),
        (  # was "big.png: image is ...; the limit is 67,108,864": no option, no next step
            ["edit", "--prompt", "x", "--image", str(big)],
            f"error: --image {big}: image is 8200x8200 = 67,240,000 pixels; the limit is 67,108,864; downscale it",
        ),
        (  # was transformers' "absolute aspect ratio must be smaller than 200" after the model loaded (HTTP 500)
            ["edit", "--prompt", "x", "--image", str(sliver)],
            "error: --image: image 1 is 2048x12 (aspect 170.7:1) (sized to 13376x64, 209:1); at resolution 1024 the model "
            "takes aspect ratios under 200:1; crop or pad it closer to square",
        ),
        # A masked edit keeps its image's size: the size asked for was ignored (and recorded in the image's settings).
        (
            [*masked, "--aspect-ratio", "16:9"],
            "error: --mask: a masked edit keeps its image's size; drop --aspect-ratio, --width and --height",
        ),
        ([*masked, "--width", "96"], "error: --mask: a masked edit keeps its image's size"),
        (
            ["edit", "--prompt", "x", "--image", str(strip), "data.resolution=64"],
            "error: --image: image 1 is 400x20 (aspect 20.0:1); at resolution 64 the model takes aspect ratios under 16:1",
        ),
    ):
        assert main([*argv, *base]) == 2
        assert message in capsys.readouterr().err  # not the missing model: the settings are checked first


def test_an_output_that_cannot_be_written_fails_before_the_model_loads(tmp_path, unloadable_model, capsys):
    """Was found only after the render: 'could not write g1.png/x.png', the image thrown away."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    (tmp_path / "taken.png").write_text("a file")
    (tmp_path / "folder.png").mkdir()
    model = ["--model", str(unloadable_model)]  # had it loaded first, the error would be about it
    for argv, output, why in (
        (["generate", "--prompt", "x"], tmp_path / "taken.png" / "o.png", "a file is where its folder should be"),
        (["generate", "--prompt", "x"], tmp_path / "folder.png", "a folder is where the file should be"),
        (
            ["layers", "--image", str(tmp_path / "in.png"), "--mask", "auto"],
            tmp_path / "taken.png" / "o.psd",
            "a file is where its folder should be",
        ),  # fmt: skip
    ):
        assert main([*argv, *model, "--output", str(output)]) == 2
        assert capsys.readouterr().err.strip() == f"error: could not write {output}: {why}; " + (
            "choose a file name and retry" if output.is_dir() else "choose a folder path and retry"
        )


def test_an_output_that_is_one_of_the_commands_inputs_is_refused_and_the_input_kept(
    tmp_path, unloadable_model, capsys, monkeypatch
):
    """`layers --image photo.png --output photo.psd` replaced the photo with its flattened PNG, and
    `edit --image p.png --output p.png` replaced its own input, as batch already refuses."""
    monkeypatch.chdir(tmp_path)
    for name in ("photo.png", "mask.png"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in ("photo.png", "mask.png")}
    model = ["--model", str(unloadable_model)]  # had it loaded first, the error would be about it
    for argv, said in (
        (["edit", "--prompt", "x", "--image", "photo.png", "--output", "./photo.png"], "--output ./photo.png is"),
        (["edit", "--prompt", "x", "--image", "photo.png", "--mask", "mask.png", "--output", str(tmp_path / "mask.png")],
         f"--output {tmp_path / 'mask.png'} is"),
        (["generate", "--from", "photo.png", "--output", "photo.png"], "--output photo.png is"),
        (["layers", "--image", "photo.png", "--mask", "auto", "--output", "photo.psd"],
         "--output photo.png (the flattened image of photo.psd) is"),
    ):  # fmt: skip
        assert main([*argv, *model]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {said} one of this command's inputs, which it must not overwrite; write to another file name"
        )
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not (tmp_path / "photo.psd").exists()


def test_an_output_over_a_users_own_image_is_refused_before_the_model_loads_and_ours_is_replaced(
    tmp_path, tiny_model_dir, unloadable_model, capsys
):
    """`generate --output master.png` wrote over a user's retouched master without a word; batch and layers keep
    such a file."""
    master = tmp_path / "master.png"
    Image.new("RGB", (64, 64), "green").save(master)
    theirs = master.read_bytes()
    argv = ["generate", "--prompt", "a mug", "--steps", "1", "--output", str(master)]
    assert main([*argv, "--model", str(unloadable_model)]) == 2  # had it loaded first, the error would be about it
    assert capsys.readouterr().err.strip() == (
        f"error: --output {master} carries no settings of qwen-lora (a file of your own, or an image retouched "
        "since), so it is kept; write to another file name, or delete it first"
    )
    assert master.read_bytes() == theirs
    # Files we cannot read were replaced unread: an artboard past the pixel limit, a TIFF named .png.
    Image.new("1", (8200, 8200)).save(big := tmp_path / "artboard.png")
    Image.new("RGB", (64, 64)).save(tiff := tmp_path / "tiff.png", format="TIFF")
    for path in (big, tiff):
        before = path.read_bytes()
        assert main([*argv[:-1], str(path), "--model", str(unloadable_model)]) == 2
        assert f"error: --output {path} carries no settings of qwen-lora" in capsys.readouterr().err
        assert path.read_bytes() == before
    (tmp_path / "empty.png").touch()  # a write cut short: replaced (the model is what fails here)
    assert main([*argv[:-1], str(tmp_path / "empty.png"), "--model", str(unloadable_model)]) == 2
    assert "model" in capsys.readouterr().err
    ours = tmp_path / "ours.png"
    for seed in ("1", "2"):  # our own render, rendered again to the same name
        assert main(["generate", "--prompt", "a mug", "--steps", "1", "--seed", seed, "--output", str(ours),
                     "--model", str(tiny_model_dir), *TINY]) == 0  # fmt: skip
    assert read_settings(ours)["seed"] == 2


def test_serve_on_a_port_in_use_is_one_line_naming_it_before_the_model_loads(unloadable_model, monkeypatch, capsys):
    """It said "serving ... at" and loaded the model, then uvicorn's raw `[Errno 98] ... address already in use`
    line, exit 3."""
    monkeypatch.setenv("QWEN_LORA_API_KEYS", "k1")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(unloadable_model), "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: serve.port: 127.0.0.1:{port} is in use by another program (another qwen-lora serve?); pick another "
        "port with --port N (or serve.port=N)"
    )
    assert main(["serve", "--model", str(unloadable_model), "--host", "no-such-host.invalid"]) == 2
    assert capsys.readouterr().err.startswith("error: serve.host: no-such-host.invalid is not a name or address")


def test_serve_refuses_one_adapter_under_two_names_before_the_model_loads(
    unloadable_model, lora_dir, monkeypatch, capsys
):
    """A request without `loras` applied both: the adapter at double strength."""
    monkeypatch.setenv("QWEN_LORA_API_KEYS", "k1")
    twice = f"serve.adapters=[{{name: a, path: {lora_dir}}}, {{name: b, path: {lora_dir / 'pytorch_lora_weights.safetensors'}}}]"
    assert main(["serve", "--model", str(unloadable_model), twice]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(
            f"error: serve.adapters {lora_dir / 'pytorch_lora_weights.safetensors'}: the same adapter (the same weights) as "
            f"serve.adapters {lora_dir}; give each adapter once"
        )
    )


def test_an_output_over_an_input_that_from_brings_in_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """`edit --from out.png --output in.png` replaced the input out.png had recorded (the check saw only the files
    named on the command line), and `--from out.png` then failed on its changed sha256."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (200, 30, 30)).save("in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save("mask.png")
    argv = ["edit", "--model", str(tiny_model_dir), *TINY, "--steps", "1"]
    assert main([*argv, "--prompt", "x", "--image", "in.png", "--mask", "mask.png", "--output", "out.png"]) == 0
    before = {name: Path(name).read_bytes() for name in ("in.png", "mask.png")}
    for target in before:
        assert main([*argv, "--from", "out.png", "--output", target]) == 2
    assert {name: Path(name).read_bytes() for name in before} == before


def test_layers_checks_its_settings_before_the_model_loads_and_takes_no_size(tmp_path, unloadable_model, capsys):
    """Its flags are the sampling fields less the size (the layers keep the input's): `--width` was taken and
    ignored, and `--steps 0` surfaced only after the model had loaded."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    base = ["layers", "--model", str(unloadable_model), "--image", str(tmp_path / "in.png"), "--mask", "auto",
            "--output", str(tmp_path / "o.psd")]  # fmt: skip
    assert main([*base, "--steps", "0"]) == 2
    assert "error: --steps: must be >= 1 and <= 1000 (got 0)" in capsys.readouterr().err  # not the missing model
    with pytest.raises(SystemExit):
        main([*base, "--width", "64"])
    assert "unrecognized arguments: --width" in capsys.readouterr().err


def _jobs(tmp_path, n=6):
    src = tmp_path / "in.png"
    Image.new("RGBA", (64, 96), (200, 30, 30, 128)).save(src)
    path = tmp_path / "jobs.jsonl"
    lines = [
        {"prompt": f"bottle {i}", "num_inference_steps": 1, **({"images": ["in.png"]} if i % 2 else {})}
        for i in range(n)
    ]
    lines[0]["id"], lines[0]["seed"], lines[0]["output"] = "hero", 42, "hero.webp"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_batch_resumes_after_an_interruption_without_redoing_finished_jobs(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Ctrl-C ends with one line (what was written, how to resume) and exit 130, not a KeyboardInterrupt traceback;
    the same command then resumes."""
    from qwen_image_lora.inference.generator import Generator

    jobs, out = _jobs(tmp_path), tmp_path / "out"
    argv = ["batch", str(jobs), "--output-dir", str(out), "--model", str(tiny_model_dir), *TINY, "--no-progress"]
    calls = []
    original = Generator.generate

    def counting(self, request):  # our generator, watched: the pipeline itself stays as diffusers ships it
        if len(calls) == stop_at:
            raise KeyboardInterrupt  # the operator pressed Ctrl-C during the third image
        calls.append(request.prompt)
        return original(self, request)

    monkeypatch.setattr(Generator, "generate", counting)
    stop_at = 0
    with monkeypatch.context() as m:  # Ctrl-C while the model loads: nothing written yet
        m.setattr(Generator, "warm_up", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1].endswith("0 images written this run -> "
                                                             f"{out / 'manifest.jsonl'}; run the same command again to resume")  # fmt: skip
    stop_at = 2
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.splitlines()[-1] == (f"process 0: stopped (Ctrl-C); 2 images written this run -> {out / 'manifest.jsonl'}; "
                                    "run the same command again to resume")  # fmt: skip
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "000001.png",
        "hero.webp",
        "manifest.jsonl",
    ]

    calls.clear()
    stop_at = None
    assert main(argv) == 0
    assert calls == [f"bottle {i}" for i in range(2, 6)]  # only the unfinished jobs ran
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in entries) == ["000001", "000002", "000003", "000004", "000005", "hero"]
    hero = next(e for e in entries if e["id"] == "hero")
    assert hero["seed"] == 42 and hero["num_inference_steps"] == 1 and hero["guidance_scale"] == 1.0
    assert hero["quality"] == 95 and all("quality" not in e for e in entries if e["id"] != "hero")  # a WebP's only
    made = read_settings(out / "hero.webp")  # the image itself says what the manifest line says
    assert (made["prompt"], made["seed"], made["num_inference_steps"], made["guidance_scale"]) == (
        "bottle 0",
        42,
        1,
        1.0,
    )
    assert next(e for e in entries if e["id"] == "000003")["seed"] == 3  # base seed + line index
    with Image.open(out / "000003.png") as im:
        assert im.size == (64, 96)  # an edit comes back at its input's size

    calls.clear()
    assert main(argv) == 0 and calls == []  # a finished batch is a no-op


def test_batch_renders_again_a_job_whose_settings_or_input_changed(tiny_model_dir, tmp_path, capsys):
    jobs, out = _jobs(tmp_path, n=3), tmp_path / "out"  # hero (t2i), 000001 (an edit of in.png), 000002 (t2i)
    argv = ["batch", str(jobs), "--output-dir", str(out), "--model", str(tiny_model_dir), *TINY, "--no-progress"]

    def rendered() -> list[str]:  # the ids of the manifest's lines, in order
        return [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()]

    assert main(argv) == 0 and rendered() == ["hero", "000001", "000002"]
    before = (out / "000002.png").read_bytes()
    lines = jobs.read_text().splitlines()
    jobs.write_text("\n".join([*lines[:2], lines[2].replace("bottle 2", "a different bottle")]) + "\n")
    assert main(argv) == 0 and rendered()[3:] == ["000002"]  # only the changed job
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])["prompt"] == "a different bottle"
    assert (out / "000002.png").read_bytes() != before
    assert "000002: its settings changed since it was rendered" in capsys.readouterr().err

    Image.new("RGBA", (64, 96), (30, 200, 30, 255)).save(tmp_path / "in.png")  # the edit's input image changed
    assert main(argv) == 0 and rendered()[4:] == ["000001"]
    assert main([*argv, "--seed", "7"]) == 0 and rendered()[5:] == ["000001", "000002"]  # hero has its own seed
    assert main([*argv, "--seed", "7", "data.resolution=128"]) == 0 and rendered()[7:] == ["hero", "000001", "000002"]
    assert main([*argv, "--seed", "7", "data.resolution=128"]) == 0 and len(rendered()) == 10  # nothing changed


def test_batch_renders_again_when_the_adapter_file_changes_not_when_its_folder_does(tiny_model_dir, lora_dir, tmp_path):
    jobs, out, lora = _jobs(tmp_path, n=1), tmp_path / "out", shutil.copytree(lora_dir, tmp_path / "lora")
    argv = [
        "batch",
        str(jobs),
        "--output-dir",
        str(out),
        "--model",
        str(tiny_model_dir),
        *TINY,
        "--no-progress",
        "--lora",
        str(lora),
    ]

    def rendered() -> int:
        return len((out / "manifest.jsonl").read_text().splitlines())

    assert main(argv) == 0 and rendered() == 1
    (lora / "eval-notes.txt").write_text("a report written beside the adapter")
    assert main(argv) == 0 and rendered() == 1
    weights = next(lora.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # retrained, in place
    assert main(argv) == 0 and rendered() == 2


def test_batch_job_errors_name_the_line_and_field(tmp_path):
    bad = tmp_path / "jobs.jsonl"
    for text, match in [
        ('{"prompt": "a"}\n{"promt": "b"}', "jobs.jsonl:2: unknown key 'promt'; did you mean 'prompt'"),
        ('{"prompt": "a", "steps": 3}', "jobs.jsonl:1: unknown key 'steps'; did you mean 'num_inference_steps'"),
        ('{"prompt": "a", "seed": "7"}', "jobs.jsonl:1: seed must be int or null"),
        (
            '{"prompt": "a", "guidance_scale": "2"}',
            r"guidance_scale must be float or null \(got '2'\); write the number",
        ),
        ('{"prompt": "a", "loras": {"brand": "high"}}', "jobs.jsonl:1: loras must be a mapping or null"),
        ('{"prompt": "a", "index": 3}', "jobs.jsonl:1: unknown key 'index'"),
        ('{"prompt": "a", "foo": 3}', "jobs.jsonl:1: unknown key 'foo'; valid keys: [^']*, quality$"),  # not `index`
        ('{"prompt": "a", "output": "../x.png"}', "must be a plain file name"),
        ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "output": "x.png"}', "also written by line 1"),
        ('{"images": ["a.png"]}', "prompt is required"),
        (
            json.dumps({"prompt": "a", "images": ["a.png"] * 11}),
            r"jobs.jsonl:1: job.images: give at most 10 input images \(got 11\)",
        ),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_jobs(bad)


def test_a_bad_jobs_file_is_one_error_line_naming_file_and_line_before_the_model_loads(
    tmp_path, capsys, unloadable_model
):
    """Each used to end in a traceback (ValueError, UnicodeDecodeError), an "all 0 jobs are done" success, or (a
    missing input) a per-job failure after the model had loaded, appended to the manifest again on every rerun."""
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    (tmp_path / "folder.png").mkdir()
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    for data, message in [
        (b'{"prompt": "x"}\n{"prompt": "y"', f"{jobs}:2: not valid JSON"),
        (b'{"prompt": "x", "prompt": "y"}\n', f"{jobs}:1: 'prompt' given twice"),
        (b'{"prompt": "x"}\n\n{"prompt": "caf\xe9"}\n', f"{jobs}:3: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
        (b'{"prompt": "x", "images": ["in.png"]}\n{"prompt": "x", "images": ["in.png", "nope.png"]}\n',
         f"{jobs}:2: images[1]: {tmp_path / 'nope.png'} does not exist (paths are relative to the jobs file)"),
        (b'{"prompt": "x", "images": ["folder.png"]}\n', f"{jobs}:1: images[0]: {tmp_path / 'folder.png'} is a folder"),
        (b'{"prompt": "x", "images": ["in.png"], "mask": "gone.png"}\n', f"{jobs}:1: mask: {tmp_path / 'gone.png'} does"),
        (b'\xef\xbb\xbf{"prompt": "x", "images": ["gone.png"]}\n', f"{jobs}:1: images[0]"),  # a BOM is not an error
        (b"", f"{jobs}: no jobs in it"),
        (b"\n  \n", f"{jobs}: no jobs in it"),
    ]:  # fmt: skip
        jobs.write_bytes(data)
        # The model cannot load: an error about the jobs file proves it was checked first.
        assert main(["batch", str(jobs), "--output-dir", str(out), "--model", str(unloadable_model)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {message}"), line
        assert not out.exists()  # nothing ran, so no manifest line either
    with pytest.raises(InputError) as e:
        read_jobs(jobs)
    assert e.value.field == "jobs"
    # Every bad line in one refusal: it named the first only, one run (and seconds of imports) per bad line.
    bad = ['{"prompt": "x"}', "{not json", '{"prompt": "x", "width": 100}', '[1]', '{"prompt": "x", "steps": 2}',
           '{"prompt": ""}']  # fmt: skip
    jobs.write_text("\n".join(bad * 3) + "\n")
    with pytest.raises(InputError) as refused:
        read_jobs(jobs)
    said = str(refused.value)
    assert said.startswith(f"15 lines of {jobs} are refused: {jobs}:2: not valid JSON") and said.endswith(
        "; and 5 more, at lines 14, 15, 16, 17, 18"  # where the rest are: it said "and 5 more" alone
    )
    assert f"{jobs}:3: job.width: must be a positive multiple of 32" in said and f"{jobs}:4: each line must be" in said
    assert f"{jobs}:5: unknown key 'steps'" in said and f"{jobs}:6: prompt is required" in said
    jobs.write_text(json.dumps({"prompt": "x", "images": ["in.png"], "mask": "in.png", "width": 96}) + "\n")
    with pytest.raises(InputError, match=r":1: job.mask: a masked edit keeps its image's size; drop aspect_ratio"):
        read_jobs(jobs)  # it failed at render time, after the model had loaded
    # A mask of another shape than its image (EXIF orientation counted) failed its job at render time.
    Image.new("L", (64, 32)).save(jobs.parent / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's portrait photo stored on its side: 64x32 pixels that show as 32x64
    Image.new("L", (64, 32), 255).save(jobs.parent / "turned.jpg", exif=exif)  # white: a mask that changes something
    jobs.write_text(json.dumps({"prompt": "x", "images": ["in.png"], "mask": "wide.png"}) + "\n")
    with pytest.raises(InputError, match=r":1: mask: 64x32 has another aspect ratio than the image \(\d+x\d+\)"):
        read_jobs(jobs)
    Image.new("RGB", (32, 64)).save(jobs.parent / "tall.png")
    jobs.write_text(json.dumps({"prompt": "x", "images": ["tall.png"], "mask": "turned.jpg"}) + "\n")
    assert read_jobs(jobs)[0].mask.endswith("turned.jpg")  # shown upright it is the image's shape
    # An all-black mask changes nothing: that job failed after the model had loaded (the others rendered).
    Image.new("L", (32, 64), 0).save(jobs.parent / "black.png")
    jobs.write_text(json.dumps({"prompt": "x", "images": ["tall.png"], "mask": "black.png"}) + "\n")
    with pytest.raises(InputError, match=r":1: mask: the mask changes nothing \(it is black everywhere\); paint white"):
        read_jobs(jobs)
    (jobs.parent / "cut.png").write_bytes((jobs.parent / "tall.png").read_bytes()[:60])  # fails its own job only
    jobs.write_text(json.dumps({"prompt": "x", "images": ["cut.png"], "mask": "turned.jpg"}) + "\n")
    assert read_jobs(jobs)[0].images[0].endswith("cut.png")
    # A refused line kept no place: the next line took its default id, and every later line was refused as a duplicate.
    lines = [{"prompt": "x", "images": [name]} for name in ("tall.png", "gone.png", "wide.png", "in.png")]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(InputError) as refused:
        read_jobs(jobs)
    assert (
        str(refused.value)
        == f"{jobs}:2: images[0]: {jobs.parent / 'gone.png'} does not exist (paths are relative to the jobs file)"
    )
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines[:1] + lines[2:]))
    assert [job.id for job in read_jobs(jobs)] == ["000000", "000001", "000002"]
    # A refused line's id was not yet taken, so a second line of that id came as a refusal of its own, next run.
    jobs.write_text('{"id": "a", "prompt": "x", "steps": 1}\n{"id": "a", "prompt": "y"}\n{"id": 7, "prompt": "z"}\n')
    with pytest.raises(
        InputError, match=rf"^2 lines .* {jobs}:2: id 'a' is also line 1's id; give each job its own id$"
    ):
        read_jobs(jobs)
    jobs.write_text('{"id": 7, "prompt": "z"}\n{"id": "7", "prompt": "z"}\n')  # an id given as a number is its text
    with pytest.raises(InputError, match=r":2: id '7' is also line 1's id"):
        read_jobs(jobs)


def test_batch_renders_again_an_empty_cut_short_or_damaged_output(tiny_model_dir, tmp_path, capsys):
    """A 0-byte output counted as finished ('3 already done'): a job is done only when its output is a whole image."""
    jobs, out = _jobs(tmp_path, n=4), tmp_path / "out"
    argv = ["batch", str(jobs), "--output-dir", str(out), "--model", str(tiny_model_dir), *TINY, "--no-progress"]
    assert main(argv) == 0
    whole = (out / "000002.png").read_bytes()
    (out / "000001.png").write_bytes(b"")  # `: > out/000001.png`
    (out / "000002.png").write_bytes(whole[: len(whole) // 2])  # cut short
    (out / "000003.png").write_bytes(b"\0" * len(whole))  # same size, no image header
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "3 written, 1 already done" in err and "000001.png is empty, cut short or damaged" in err
    for name in ("000001.png", "000002.png", "000003.png"):
        with Image.open(out / name) as im:
            im.load()
    (out / "000003.png").write_bytes(b"")  # and a manifest without its line: not taken as a finished image
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["id"] != "000003"))
    assert main(argv) == 0
    assert "1 written, 3 already done" in capsys.readouterr().err
    assert main(argv) == 0 and "nothing left to do: all 4 jobs are done" in capsys.readouterr().err


def test_batch_shards_across_two_accelerate_processes(tiny_model_dir, tmp_path):
    jobs, out = _jobs(tmp_path), tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*accelerate_launch(2, "--multi_gpu"), "-m", "qwen_image_lora.cli", "batch", str(jobs), "--output-dir",
           str(out), "--model", str(tiny_model_dir), *TINY, "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    ids = [e["id"] for e in entries]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6  # every job once, no duplicates
    by_process = {e["process_index"]: set() for e in entries}
    for e in entries:
        by_process[e["process_index"]].add(e["index"])
    assert by_process == {0: {0, 2, 4}, 1: {1, 3, 5}}
    assert len([p for p in out.iterdir() if p.suffix in (".png", ".webp")]) == 6


def test_overrides_reach_generate_edit_and_batch(tiny_model_dir, tmp_path, capsys):
    # The model comes only from an override written after the other options, as on every other command.
    out = tmp_path / "a.png"
    argv = [
        "generate",
        "--prompt",
        "a bottle",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        str(out),
        f"model.pretrained={tiny_model_dir}",
        "model.dtype=float32",
    ]
    assert main(argv) == 0 and out.is_file()
    src = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(src)
    assert (
        main(
            [
                "edit",
                "--image",
                str(src),
                "--prompt",
                "x",
                "--output",
                str(tmp_path / "e.png"),
                f"model.pretrained={tmp_path / 'nope'}",
            ]
        )
        == 2
    )
    assert f"model.pretrained: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    jobs = _jobs(tmp_path, n=1)
    assert main(["batch", str(jobs), "--output-dir", str(tmp_path / "b"), f"model.pretrained={tmp_path / 'nope'}"]) == 2
    assert f"model.pretrained: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--output", str(out), "--bogus"])  # a real unknown option still fails


def test_help_speaks_to_users_and_batch_help_shows_a_valid_job_line(tmp_path, capsys):
    import dataclasses

    from qwen_image_lora.inference.jobs import Job

    fields = [f.name for f in dataclasses.fields(Job) if not f.metadata.get("internal")]
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "qwen-lora validate" in top and "accelerate launch train/lora.py" in top and "register(" not in top
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = capsys.readouterr().out
    assert "batch.py" not in text and all(field in text for field in fields)
    assert "width in pixels (or aspect_ratio)" in text  # a jobs file's key; the flags' help names the flag
    example = text.split("example line:")[1].strip().splitlines()[0]
    (tmp_path / "jobs.jsonl").write_text(example + "\n")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "sku-123.jpg")  # the input it names (inputs are checked)
    (job,) = read_jobs(tmp_path / "jobs.jsonl")  # the documented example is a valid job
    assert job.id == "sku-123" and job.output_name == "sku-123.webp"
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = capsys.readouterr().out  # a value's kind, as the sampling flags' N and X (was QUALITY, MASK_FEATHER)
    assert "--quality N" in text and "--mask-feather PX" in text and not re.search(r"--\S+ [A-Z_]{7,}\b", text)
    assert "(or --aspect-ratio)" in text and "(or --width/--height)" in " ".join(text.split())
    with pytest.raises(SystemExit):
        main(["layers", "--help"])
    # the default background prompt as the generator uses it (the help said "remove the subject ... where it was")
    assert f"(default: {DEFAULT_BACKGROUND_PROMPT})" in " ".join(capsys.readouterr().out.split())
    assert layers.DEFAULT_BACKGROUND_PROMPT is DEFAULT_BACKGROUND_PROMPT


def test_batch_with_nothing_left_says_so_without_loading_the_model(tmp_path, capsys, unloadable_model):
    jobs, out = _jobs(tmp_path, n=3), tmp_path / "out"
    out.mkdir()
    for job in read_jobs(jobs):  # a finished batch: every image and its manifest line
        Image.new("RGB", (8, 8)).save(out / job.output_name)
    (out / "manifest.jsonl").write_text("".join(json.dumps({"id": job.id}) + "\n" for job in read_jobs(jobs)))
    # The model cannot load: any attempt to load it would fail the command.
    argv = ["batch", str(jobs), "--output-dir", str(out), "--model", str(unloadable_model)]
    assert main(argv) == 0
    assert "nothing left to do: all 3 jobs are done" in capsys.readouterr().err
    (out / "000001.png").unlink()  # one job left: now the model is needed (and its absence is reported)
    assert main(argv) == 2
    assert f"{unloadable_model} could not be loaded" in capsys.readouterr().err


def test_batch_prints_progress_lines_when_stderr_is_not_a_terminal(tiny_model_dir, tmp_path, capsys, monkeypatch):
    jobs, out = _jobs(tmp_path, n=2), tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "QWEN_LORA_PROGRESS_SECONDS": "0"}
    cmd = [
        sys.executable,
        "-m",
        "qwen_image_lora.cli",
        "batch",
        str(jobs),
        "--output-dir",
        str(out),
        "--model",
        str(tiny_model_dir),
        *TINY,
    ]
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True, timeout=240)  # stderr is a pipe
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.split()[1:2] == ["batch"]]  # one process: no "1/1"
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"], proc.stderr
    assert "s/img, ETA" in lines[0] and "\r" not in proc.stderr
    # A rerun's finished jobs counted at the speed of a file check: "1/2 (50%) | 3180 imgs/s, ETA 0:00:00".
    (out / "000001.png").unlink()
    monkeypatch.setenv("QWEN_LORA_PROGRESS_SECONDS", "0")
    assert main(cmd[3:]) == 0  # in-process (capsys: not a terminal either), a second start-up spared
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.split()[1:2] == ["batch"]]
    assert [line.split()[2:4] for line in lines] == [["1/2", "(50%)"], ["2/2", "(100%)"]], err
    assert "|" not in lines[0] and re.search(r"\| [\d.]+ s/img, ETA", lines[1]), lines


def test_generate_without_a_size_uses_the_configs_pixel_budget(tiny_model_dir, tmp_path):
    """The budget has one name, data.resolution: a config trained at 96 px generates at 96 px, not 1024."""
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  pretrained: {tiny_model_dir}\n  dtype: float32\ndata:\n  resolution: 96\n")
    out = tmp_path / "a.png"
    assert (
        main(["generate", "--config", str(config), "--prompt", "a bottle", "--steps", "1", "--output", str(out)]) == 0
    )
    with Image.open(out) as im:
        assert im.size == (96, 96)


def test_one_side_given_keeps_the_aspect_of_the_input_or_a_square(tiny_model_dir, tmp_path, capsys):
    """On a 3:2 photo `--height 256` came back at the photo's own size (the side ignored) and `--width 256` at
    256x96 (the budget's height: stretched to 2.67:1); `generate --width 256` gave 256x(the budget)."""
    Image.new("RGB", (192, 128), (90, 140, 200)).save(tmp_path / "photo.png")
    argv = ["--model", str(tiny_model_dir), *TINY, "--prompt", "x", "--steps", "1"]
    edit = ["edit", *argv, "--image", str(tmp_path / "photo.png")]
    for command, size in (
        ([*edit, "--height", "64"], (96, 64)),
        ([*edit, "--width", "288"], (288, 192)),
        ([*edit, "--width", "64", "--height", "64"], (64, 64)),
        ([*edit], (192, 128)),  # no size: its own back
        (["generate", *argv, "--width", "96"], (96, 96)),
    ):
        assert main([*command, "--output", str(tmp_path / "o.png")]) == 0
        with Image.open(tmp_path / "o.png") as im:
            assert im.size == size, command
    # A side the grid cannot hold was clamped, and the aspect changed without a word.
    Image.new("RGB", (100, 1000)).save(tmp_path / "tall.png")
    assert main(["edit", *argv, "--image", str(tmp_path / "tall.png"), "--width", "1024",
                 "--output", str(tmp_path / "o.png")]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip() == (
        "error: --width: 1024 keeps the 100x1000 image's aspect only with a --height of 10240 px, outside 32..4096; "
        "give both sides, or a --width that fits"
    )


def test_an_edit_of_a_large_photo_comes_back_at_its_size_with_the_kept_pixels_exact(tiny_model_dir, tmp_path, capsys):
    """A 3072x2048 photo came back at 2048x1365 with no note, a masked edit's "kept" pixels resampled."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (1400, 2240, 3), dtype=np.uint8)  # over the 2048 it was read at
    Image.fromarray(photo).save(tmp_path / "photo.png")
    mask = np.zeros((1400, 2240), np.uint8)
    mask[:, :1120] = 255  # the left half may change
    Image.fromarray(mask).save(tmp_path / "mask.png")
    argv = ["edit", "--model", str(tiny_model_dir), *TINY, "--prompt", "x", "--steps", "1"]
    assert main([*argv, "--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                 "--output", str(tmp_path / "o.png")]) == 0  # fmt: skip
    with Image.open(tmp_path / "o.png") as im:
        out = np.asarray(im.convert("RGB"))
    assert out.shape == photo.shape and np.array_equal(out[:, 1120:], photo[:, 1120:])
    Image.new("RGB", (4160, 2080), (20, 90, 160)).save(tmp_path / "huge.png")
    capsys.readouterr()
    assert main([*argv, "--image", str(tmp_path / "huge.png"), "--output", str(tmp_path / "h.png")]) == 0
    assert f"note: --image {tmp_path / 'huge.png'} is 4160x2080; it is read at 4096 px on its long side" in (
        capsys.readouterr().err
    )
    with Image.open(tmp_path / "h.png") as im:
        assert im.size == (4096, 2048)


def test_generate_with_a_runs_adapter_and_no_config_uses_the_size_it_trained_at(
    tiny_model_dir, lora_dir, tmp_path, capsys
):
    """Without --config, `--lora RUN` generated at the default 1024 px, not the run's data.resolution."""
    run = tmp_path / "run"
    shutil.copytree(lora_dir, run)
    (run / "config.yaml").write_text("data:\n  resolution: 96\n")  # what a run folder (and each checkpoint) holds
    out = tmp_path / "a.png"
    argv = ["generate", "--model", str(tiny_model_dir), "--dtype", "float32", "--prompt", "a bottle", "--steps", "1"]
    assert main([*argv, "--lora", str(run), "--output", str(out)]) == 0
    assert "note: data.resolution 96, as" in capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (96, 96)
    assert main([*argv, "--lora", str(run), "data.resolution=64", "--output", str(out)]) == 0  # said here: it wins
    with Image.open(out) as im:
        assert im.size == (64, 64)


def test_every_spelling_of_a_runs_or_checkpoints_adapter_finds_the_resolution_it_trained_at(tmp_path):
    """`--lora RUN/checkpoints/step-N/adapter/pytorch_lora_weights.safetensors` rendered at 1024 px with no note,
    while the same checkpoint named by its folder used its config's 128."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000005"
    (step / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  resolution: 96\n")
    (step / "config.yaml").write_text("data:\n  resolution: 128\n")
    for weights in (run / "pytorch_lora_weights.safetensors", step / "adapter" / "pytorch_lora_weights.safetensors"):
        weights.write_bytes(b"")
    for source, resolution in (
        (run, 96),
        (run / "pytorch_lora_weights.safetensors", 96),
        (step, 128),
        (step / "adapter", 128),
        (f"{step / 'adapter' / 'pytorch_lora_weights.safetensors'}:0.8", 128),
    ):
        assert layout.trained_config(parse_lora_arg(str(source))[0])[0]["data"]["resolution"] == resolution, source
    assert layout.trained_config(tmp_path / "elsewhere.safetensors") is None


def test_one_adapter_given_twice_is_refused_and_a_missing_one_names_its_option(tmp_path, unloadable_model, capsys):
    """`--lora run --lora run` loaded it twice (as run and run-2), its strength doubled; the API refuses that. A
    missing adapter's line did not say it came from --lora."""
    run = tmp_path / "run"
    run.mkdir()
    save_file({"a": torch.zeros(1)}, str(run / "pytorch_lora_weights.safetensors"))  # two readable files
    argv = ["generate", "--model", str(unloadable_model), "--prompt", "x", "--output", str(tmp_path / "o.png")]
    step = tmp_path / "run2" / "checkpoints" / "step-000005"
    (step / "adapter").mkdir(parents=True)
    save_file({"a": torch.ones(1)}, str(step / "adapter" / "pytorch_lora_weights.safetensors"))
    os.link(step / "adapter" / "pytorch_lora_weights.safetensors", tmp_path / "linked.safetensors")
    # a copy (or a run's last checkpoint, which holds the final adapter's bytes) rendered at double strength
    shutil.copy(step / "adapter" / "pytorch_lora_weights.safetensors", tmp_path / "copy.safetensors")
    for first, second in ((run, run), (run, f"{run}/pytorch_lora_weights.safetensors:0.5"), (run, f"{run}/"),
                          (step, step / "adapter"), (step, tmp_path / "linked.safetensors"),
                          (step, tmp_path / "copy.safetensors")):  # fmt: skip
        assert main([*argv, "--lora", str(first), "--lora", str(second)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --lora {str(second).rsplit(':', 1)[0]}: the same adapter (the same weights) as --lora {first}; "
            "give each adapter once, at the weight you want (PATH:WEIGHT)"
        )
    assert main([*argv, "--lora", str(tmp_path / "runz")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --lora {tmp_path / 'runz'}: no such adapter file or folder")


def test_a_job_line_takes_the_apis_loras_and_every_edges_limits(tmp_path):
    """Batch lines refused the HTTP API's `loras` list and took quality 101, mask_feather 1000 and a weight of 100."""
    jobs = tmp_path / "jobs.jsonl"
    line = {"prompt": "x", "loras": [{"name": "brand", "weight": 0.5}, {"name": "style"}]}
    jobs.write_text(json.dumps(line) + "\n" + json.dumps({"prompt": "y", "loras": {"brand": 0.25}}) + "\n")
    first, second = read_jobs(jobs)
    assert first.loras == {"brand": 0.5, "style": None} and second.loras == {"brand": 0.25}
    # As over HTTP, an omitted weight is the configured one: here the --lora weight.
    assert batch._job_loras(first, {"style": 0.7, "other": 1.0}) == {"brand": 0.5, "style": 0.7}
    for bad, said in [
        ({"quality": 101}, "job.quality: must be a number from 1 to 100"),
        ({"loras": {"brand": 100}}, "job.loras.brand: must be a number from -4.0 to 4.0"),
        ({"loras": [{"name": "brand", "wieght": 1}]}, 'loras: a list holds {"name": ..., "weight": ...} objects'),
        ({"loras": [{"name": "brand"}, {"name": "brand"}]}, "loras: adapter 'brand' is given twice"),
    ]:
        jobs.write_text(json.dumps({"prompt": "x", **bad}) + "\n")
        with pytest.raises(InputError, match="jobs.jsonl:1: ") as refused:
            read_jobs(jobs)
        assert said in str(refused.value)


def test_batch_does_not_render_again_for_the_same_adapter_named_from_another_folder(
    tiny_model_dir, lora_dir, tmp_path, monkeypatch
):
    """The run's fingerprint held the --lora text as typed: from another folder every job rendered again."""
    jobs, out = _jobs(tmp_path, n=2), tmp_path / "out"
    argv = ["batch", str(jobs), "--output-dir", str(out), "--model", str(tiny_model_dir), *TINY, "--no-progress"]

    def rendered() -> int:
        return len((out / "manifest.jsonl").read_text().splitlines())

    assert main([*argv, "--lora", f"{lora_dir}:0.5"]) == 0 and rendered() == 2
    monkeypatch.chdir(lora_dir.parent)
    assert main([*argv, "--lora", f"{lora_dir.name}:0.5"]) == 0 and rendered() == 2
    assert main([*argv, "--lora", f"{lora_dir.name}:0.6"]) == 0 and rendered() == 4  # another weight: rendered again


def test_a_job_naming_an_adapter_no_lora_gives_is_refused_before_the_model_loads(
    tmp_path, capsys, lora_dir, unloadable_model
):
    """It failed after the model had loaded, as a failed job without its line; then after the imports, in a round of
    its own after every other bad line had been fixed."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "x", "loras": [{"name": "nobody", "weight": 1}]}) + "\n"
                    + json.dumps({"id": "b", "prompt": "x", "width": 100}) + "\n")  # fmt: skip
    argv = ["batch", str(jobs), "--output-dir", str(tmp_path / "out"), "--model", str(unloadable_model)]
    assert main([*argv, "--lora", str(lora_dir)]) == 2  # the model cannot load: the check came first
    err = capsys.readouterr().err
    assert f"2 lines of {jobs} are refused: {jobs}:1: loras: unknown adapter 'nobody'; --lora gives: brand; " in err
    assert f"{jobs}:2: job.width: must be" in err


def test_batch_says_the_names_its_adapters_go_by(tmp_path, capsys, lora_dir, unloadable_model):
    """Two folders of the same name become `brand` and `brand-2`, which a job's "loras" must use: they were never
    shown."""
    other = tmp_path / "other" / lora_dir.name
    shutil.copytree(lora_dir, other)
    weights = other / "pytorch_lora_weights.safetensors"  # another adapter: the same weights are refused as one
    save_file({k: v + 1 for k, v in load_file(str(weights)).items()}, str(weights))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "x", "loras": {"brand-2": 0.5}}) + "\n")
    argv = ["batch", str(jobs), "--output-dir", str(tmp_path / "out"), "--model", str(unloadable_model)]
    assert main([*argv, "--lora", str(lora_dir), "--lora", str(other)]) == 2  # the model cannot load
    assert capsys.readouterr().err.splitlines()[0] == (
        f'adapters: brand = {lora_dir}, brand-2 = {other} (a job\'s "loras" names them)'
    )


@pytest.mark.parametrize(
    ("argv", "usage", "line"),
    [
        (["generate", "--prompt", "x", "--sead", "5", "--output", "a.png"], "usage: qwen-lora generate ",
         "qwen-lora generate: error: unrecognized arguments: --sead; did you mean --seed?"),
        (["plan", "--config", "c.yaml", "--gpu-memroy", "8GB"], "usage: qwen-lora plan ",
         "qwen-lora plan: error: unrecognized arguments: --gpu-memroy; did you mean --gpu-memory?"),
        (["data", "doctor", "c.yaml", "--strcit"], "usage: qwen-lora data doctor ",
         "qwen-lora data doctor: error: unrecognized arguments: --strcit; did you mean --strict?"),
        (["generate", "--prompt", "x", "--zzz", "--output", "a.png"], "usage: qwen-lora generate ",
         "qwen-lora generate: error: unrecognized arguments: --zzz"),
    ],
)  # fmt: skip
def test_a_mistyped_option_gets_its_commands_usage_and_the_nearest_option(argv, usage, line, capsys):
    """Was the top level's usage (`qwen-lora [-h] {validate,...}`) and no suggestion."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(usage) and err.splitlines()[-1] == line


def test_the_trainer_names_the_nearest_option_too(capsys):
    """`train/lora.py --resmue latest` was refused without the suggestion every `qwen-lora` command gives."""
    with pytest.raises(SystemExit) as exited:
        early.parse(early.build_parser("the trainer"), ["--config", "c.yaml", "--resmue", "latest"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("usage: train/lora.py ")
    assert err.splitlines()[-1] == "train/lora.py: error: unrecognized arguments: --resmue; did you mean --resume?"
    args = early.parse(early.build_parser("the trainer"), ["train.max_steps=3", "--config", "c.yaml", "lora.rank=4"])
    assert (args.config, args.overrides) == ("c.yaml", ["train.max_steps=3", "lora.rank=4"])


def test_batch_without_arguments_names_only_what_is_required_and_help_states_the_limits(capsys):
    """It said `the following arguments are required: jobs, --output-dir, overrides`, though overrides are optional;
    --quality and --mask-feather did not say their limits, which every edge enforces."""
    with pytest.raises(SystemExit) as stopped:
        main(["batch"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qwen-lora batch: error: the following arguments are required: jobs, --output-dir"
    )
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "JPEG/WebP quality, 1-100, 100 a lossless WebP" in said and "in pixels, 0-64 (default 8)" in said


def test_batch_refuses_a_base_seed_out_of_range_before_the_model_loads(tmp_path, capsys, unloadable_model):
    """`--seed -1` failed every job after the model had loaded; a seed near the top overflowed on later jobs."""
    jobs = _jobs(tmp_path, n=2)
    argv = ["batch", str(jobs), "--output-dir", str(tmp_path / "out"), "--model", str(unloadable_model)]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--seed", "-1"])
    assert exited.value.code == 2 and "error: --seed: must be a whole number from 0 to" in capsys.readouterr().err
    assert main([*argv, "--seed", str(2**63 - 1)]) == 2
    assert f"--seed: {2**63 - 1} + 1 (the last job's index) passes the largest seed" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "line"), [
    (["generate", "--prompt", "x", "--quality", "101", "--output", "a.webp"],
     "error: --quality: must be a whole number from 1 to 100 (got '101') (`qwen-lora generate --help` lists the options)"),
    (["edit", "--prompt", "x", "--image", "a.png", "--mask-feather", "-1", "--output", "b.png"],
     "error: --mask-feather: must be a whole number from 0 to 64 (got '-1') (`qwen-lora edit --help` lists the options)"),
    (["generate", "--prompt", "x", "--width", "64x", "--output", "a.png"],
     "error: --width: invalid int value: '64x' (`qwen-lora generate --help` lists the options)"),
])  # fmt: skip
def test_a_value_an_option_refuses_is_one_line_naming_the_option(argv, line, capsys):
    """`--steps 0` was one line; `--quality 101` printed the command's 9-line usage before its error."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_an_adapter_of_a_run_renders_on_the_base_model_it_trained_on(tiny_model_dir, lora_dir, tmp_path, capsys):
    """Without --config or --model, `generate --lora RUN` took the run's resolution but the default hub model: offline
    an error about a model never named, online a download of another one."""
    run = tmp_path / "runs" / "brand"
    shutil.copytree(lora_dir, run)
    (run / "config.yaml").write_text(
        f"model:\n  pretrained: {tiny_model_dir}\n  dtype: float32\n  revision: '0123'\ndata:\n  resolution: 64\n"
    )
    out = tmp_path / "o.png"
    assert main(["generate", "--lora", str(run), "--prompt", "a bottle", "--steps", "1", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    said = f"note: base model {tiny_model_dir} in float32, as {run / 'config.yaml'} trained (--model picks another)"
    assert said in err and "no config given" not in err
    # In the run's precision too: in bfloat16 (the default) the run's own preview came out 7/255 off.
    assert read_settings(out)["model"]["dtype"] == "float32" and read_settings(out)["model"]["revision"] == "0123"
    assert read_settings(out)["model"]["pretrained"] == str(tiny_model_dir)
    argv = ["generate", "--lora", str(run), "--prompt", "a bottle", "--steps", "1", "--output", str(out)]
    assert main([*argv, "--dtype", "bfloat16"]) == 0 and read_settings(out)["model"]["dtype"] == "bfloat16"
    # Named, the model given wins; so does a config.
    assert main(["generate", "--lora", str(run), "--model", "someone/base", "--prompt", "x", "--output", str(out)]) == 2
    assert "model.pretrained: someone/base" in capsys.readouterr().err


def test_serve_runs_its_adapters_run_on_the_base_model_and_size_they_trained_at(tiny_model_dir, lora_dir, tmp_path,
                                                                                 capsys):  # fmt: skip
    """`serve 'serve.adapters=[{path: RUN}]'` asked for the default hub model (generate --lora RUN takes the run's),
    and with --model served at 1024 px an adapter trained at 64."""
    run = tmp_path / "runs" / "brand"
    shutil.copytree(lora_dir, run)
    (run / "config.yaml").write_text(
        f"model:\n  pretrained: {tiny_model_dir}\n  dtype: float32\ndata:\n  resolution: 64\n"
    )
    for given in ([], ["--model", str(tiny_model_dir)]):
        args = build_parser().parse_args(["serve", *given, f"serve.adapters=[{{path: {run}}}]"])
        args.prepare(args)
        cfg = _model_source(args)
        assert (cfg.model.pretrained, cfg.data.resolution) == (str(tiny_model_dir), 64)
        assert f"note: data.resolution 64, as {run / 'config.yaml'} trained" in capsys.readouterr().err
    assert cfg.model.dtype == "bfloat16"  # a model named: its run's precision is not assumed


def test_a_guidance_scale_that_acts_on_nothing_is_said_once(tiny_model_dir, tmp_path, capsys, caplog):
    """Said before the model loads, it is not said again by the generator after the load (which HTTP clients and the
    Python API hear), and the image records the guidance that acted."""
    out = tmp_path / "g.png"
    argv = ["generate", "--model", str(tiny_model_dir), *TINY, "--prompt", "x", "--steps", "1", "--output", str(out)]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--guidance-scale", "5"]) == 0
    assert capsys.readouterr().err.count("acts only with") == 1 and "acts only with" not in caplog.text
    assert read_settings(out)["guidance_scale"] == 1.0


def test_flags_that_change_nothing_are_said_before_the_model_loads(tmp_path, capsys, unloadable_model):
    """`--quality` for a PNG, `--mask-feather` without a mask and guidance without a negative prompt were taken
    silently (and recorded in the image's settings as if they had acted)."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    argv = ["edit", "--model", str(unloadable_model), "--prompt", "x", "--image", str(tmp_path / "in.png")]
    main(
        [*argv, "--quality", "50", "--mask-feather", "9", "--guidance-scale", "4", "--output", str(tmp_path / "a.png")]
    )
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --")]
    assert notes == [
        "note: --quality applies to JPEG and WebP outputs; a PNG is lossless",
        "note: --mask-feather applies only to a masked edit (with a mask)",
        "note: --guidance-scale acts only with --negative-prompt (Qwen-Image 2.1 samples without guidance)",
    ]
    main([*argv, "--negative-prompt", "blur", "--output", str(tmp_path / "a.png")])
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --")] == [
        "note: --negative-prompt acts only with a --guidance-scale above 1 (the default is 1.0: no guidance)"
    ]
    main(
        [
            *argv,
            "--quality",
            "50",
            "--guidance-scale",
            "4",
            "--negative-prompt",
            "blur",
            "--output",
            str(tmp_path / "a.webp"),
        ]
    )
    assert "note: --" not in capsys.readouterr().err
