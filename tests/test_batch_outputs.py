"""Which file a batch job may claim as its output, and which it may overwrite; one id per job."""

import json
import logging
import re
import unicodedata

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from qwen_image_lora.cli import main
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import SETTINGS_KEY, ours_to_replace, read_settings
from qwen_image_lora.inference.batch import run_batch
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.jobs import read_jobs

RED_MUG = {"prompt": "a red mug", "num_inference_steps": 1, "width": 64, "height": 64}
BLUE_BOTTLE = {"prompt": "a blue bottle", "num_inference_steps": 2, "width": 128, "height": 128}


@pytest.fixture
def gen(tiny_pipe, monkeypatch):
    """The tiny model's generator; `gen.rendered` lists the prompts it rendered."""
    generator = Generator(tiny_pipe, resolution=64)
    generator.rendered = []
    original = generator.generate

    def counting(request):
        generator.rendered.append(request.prompt)
        return original(request)

    monkeypatch.setattr(generator, "generate", counting)
    return generator


def _write_jobs(path, *lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _manifest(out) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_an_image_another_jobs_file_left_is_rendered_again_not_adopted(gen, tmp_path, capsys):
    """It was adopted: '0 written, 1 already done', a manifest line saying blue bottle 128x128 over a 64x64 red mug."""
    out = tmp_path / "out"
    run_batch(gen, read_jobs(_write_jobs(tmp_path / "a.jsonl", RED_MUG)), out, progress=False)
    (out / "manifest.jsonl").unlink()
    result = run_batch(gen, read_jobs(_write_jobs(tmp_path / "b.jsonl", BLUE_BOTTLE)), out, progress=False)
    assert result.written == ["000000"] and gen.rendered == ["a red mug", "a blue bottle"]
    with Image.open(out / "000000.png") as im:
        assert im.size == (128, 128)
    assert read_settings(out / "000000.png")["prompt"] == "a blue bottle"
    (entry,) = _manifest(out)
    assert entry["prompt"] == "a blue bottle" and "recovered" not in entry
    assert "000000.png holds an image made with other settings; rendering it again" in capsys.readouterr().err


def test_a_job_stopped_before_its_manifest_line_is_adopted_without_rendering_again(gen, tmp_path):
    out, jobs = tmp_path / "out", _write_jobs(tmp_path / "a.jsonl", RED_MUG, {**RED_MUG, "output": "mug.webp"})
    run_batch(gen, read_jobs(jobs), out, progress=False)
    (out / "manifest.jsonl").unlink()  # as if stopped between each image and its line
    gen.rendered.clear()
    result = run_batch(gen, read_jobs(jobs), out, progress=False)
    assert result.skipped == ["000000", "000001"] and gen.rendered == []
    assert [(e["id"], e.get("recovered")) for e in _manifest(out)] == [("000000", True), ("000001", True)]


def test_an_image_the_batch_did_not_write_is_kept_and_its_job_refused(gen, tmp_path, capsys):
    """The user's own image at a job's output name was recorded as that job's result; now the job is refused (the
    others still run), the file is left as it was, and a rerun refuses it again."""
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (64, 64), "green").save(out / "000000.png")
    theirs = (out / "000000.png").read_bytes()
    jobs = read_jobs(_write_jobs(tmp_path / "a.jsonl", RED_MUG, BLUE_BOTTLE))
    for _ in range(2):
        result = run_batch(gen, jobs, out, progress=False)
        assert result.failed == ["000000"] and (out / "000000.png").read_bytes() == theirs
    assert result.skipped == ["000001"] and gen.rendered == ["a blue bottle"]
    err = capsys.readouterr().err
    assert f"job 000000: {out / '000000.png'} carries no settings of qwen-lora batch" in err
    assert 'give this job another "output" name, or use another --output-dir' in err
    assert all("error" in e for e in _manifest(out) if e["id"] == "000000")


def test_a_finished_output_retouched_and_exported_again_is_kept_when_the_batch_runs_again(gen, tmp_path, capsys):
    """Adding a job and rerunning rendered over a deliverable retouched since (re-exported without our settings, so
    at another size than its manifest line records) as "empty, cut short or damaged"."""
    out, jobs = tmp_path / "out", _write_jobs(tmp_path / "a.jsonl", RED_MUG)
    run_batch(gen, read_jobs(jobs), out, progress=False)
    with Image.open(out / "000000.png") as im:
        retouched = im.convert("RGB")
    retouched.paste((0, 0, 255), (0, 0, 30, 30))
    retouched.save(out / "000000.png")  # a plain export: no settings block
    theirs = (out / "000000.png").read_bytes()
    gen.rendered.clear()
    result = run_batch(gen, read_jobs(_write_jobs(tmp_path / "a.jsonl", RED_MUG, BLUE_BOTTLE)), out, progress=False)
    assert result.failed == ["000000"] and result.written == ["000001"] and gen.rendered == ["a blue bottle"]
    assert (out / "000000.png").read_bytes() == theirs
    assert f"job 000000: {out / '000000.png'} carries no settings of qwen-lora batch" in capsys.readouterr().err


def test_an_output_whose_settings_of_ours_are_damaged_is_rendered_again_as_generate_would(gen, tmp_path, capsys):
    """A whole image with a damaged settings block of ours was refused as "a file of your own" when no manifest line
    recorded it, while `generate --output` (`ours_to_replace`) writes over the same file: one rule for both."""
    out = tmp_path / "out"
    out.mkdir()
    block = PngInfo()
    block.add_text(SETTINGS_KEY, '{"prompt": "a red mu')  # a block of ours, cut short
    Image.new("RGB", (64, 64), "green").save(out / "000000.png", pnginfo=block)
    assert ours_to_replace(out / "000000.png")
    result = run_batch(gen, read_jobs(_write_jobs(tmp_path / "a.jsonl", RED_MUG)), out, progress=False)
    assert result.written == ["000000"] and gen.rendered == ["a red mug"]
    assert read_settings(out / "000000.png")["prompt"] == "a red mug"
    assert "000000.png holds an image made with other settings; rendering it again" in capsys.readouterr().err


def test_an_edits_manifest_line_renders_the_same_image_again(gen, tmp_path):
    """Every edit's line recorded the output's size as width/height: fed back as a job, an unmasked edit rendered at
    that size (another image), and a masked one was refused (a masked edit keeps its image's size). A preset's line
    recorded its aspect_ratio beside the size it gave, a line every edge refuses."""
    Image.new("RGB", (80, 64), "orange").save(tmp_path / "photo.png")
    Image.new("L", (80, 64), 0).save(tmp_path / "mask.png")
    with Image.open(tmp_path / "mask.png") as m:
        m.paste(255, (40, 0, 80, 64))
        m.save(tmp_path / "mask.png")
    edit = {"prompt": "on marble", "num_inference_steps": 2, "images": ["photo.png"]}
    wide = {"prompt": "a wide mug", "num_inference_steps": 2, "aspect_ratio": "16:9"}  # fmt: skip
    first = _write_jobs(tmp_path / "a.jsonl", edit, {**edit, "mask": "mask.png"}, RED_MUG, wide)
    run_batch(gen, read_jobs(first), tmp_path / "out", progress=False)
    bookkeeping = ("index", "model", "resolution", "process_index", "seconds", "settings", "bytes")
    lines = [{k: v for k, v in e.items() if k not in bookkeeping} for e in _manifest(tmp_path / "out")]
    assert [(e.get("width"), e.get("height")) for e in lines][:3] == [(None, None), (None, None), (64, 64)]
    again = tmp_path / "again"
    run_batch(gen, read_jobs(_write_jobs(tmp_path / "b.jsonl", *lines)), again, progress=False)
    for name in ("000000.png", "000001.png", "000002.png", "000003.png"):
        with Image.open(tmp_path / "out" / name) as a, Image.open(again / name) as b:
            assert a.tobytes() == b.tobytes(), name


def test_a_job_whose_output_is_its_own_input_is_refused(gen, tmp_path, capsys):
    """An edit of out/photo.png written to photo.png recorded the input as its output; one of our own renders used
    as the input would be overwritten, and its job would never settle (its input changes with every render)."""
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (64, 64), "green").save(out / "photo.png")
    theirs = (out / "photo.png").read_bytes()
    edit = {"prompt": "on marble", "num_inference_steps": 1, "images": ["out/photo.png"], "output": "photo.png"}
    result = run_batch(gen, read_jobs(_write_jobs(tmp_path / "a.jsonl", edit)), out, progress=False)
    assert result.failed == ["000000"] and (out / "photo.png").read_bytes() == theirs

    run_batch(gen, read_jobs(_write_jobs(tmp_path / "b.jsonl", {**RED_MUG, "output": "mug.png"})), out, progress=False)
    ours = (out / "mug.png").read_bytes()
    jobs = _write_jobs(tmp_path / "c.jsonl", {**edit, "id": "again", "images": ["out/mug.png"], "output": "mug.png"})
    result = run_batch(gen, read_jobs(jobs), out, progress=False)
    assert result.failed == ["again"] and (out / "mug.png").read_bytes() == ours
    assert f"job again: {out / 'mug.png'} is one of this job's own inputs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [{"id": "a", "prompt": "x", "output": "a1.png"}, {"id": "a", "prompt": "y", "output": "a2.png"}],
            "jobs.jsonl:2: id 'a' is also line 1's id; give each job its own id",
        ),
        (
            [{"id": "000001", "prompt": "x"}, {"prompt": "y", "output": "y.png"}],
            "jobs.jsonl:2: id '000001' is also line 1's id (a line without an id is named by its position)",
        ),
    ],
)
def test_read_jobs_refuses_a_repeated_id_before_the_model_loads(lines, message, tmp_path, capsys, unloadable_model):
    """Two jobs under one id were each rendered on every rerun ('its settings changed since it was rendered')."""
    jobs = _write_jobs(tmp_path / "jobs.jsonl", *lines)
    with pytest.raises(InputError, match="^" + re.escape(str(tmp_path / message))) as e:
        read_jobs(jobs)
    assert e.value.field == "id"
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--output-dir", str(out), "--model", str(unloadable_model)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / message}") and not out.exists()


def test_folders_where_the_batch_writes_files_are_named_before_any_render(gen, tmp_path, capsys, unloadable_model):
    """A folder at manifest.jsonl was found after the model had loaded and the first image was written (left with no
    manifest line); a folder at an output name read 'empty, cut short or damaged', then a raw `[Errno 21]`."""
    jobs, out = _write_jobs(tmp_path / "jobs.jsonl", RED_MUG, {**RED_MUG, "output": "taken.png"}), tmp_path / "out"
    (out / "manifest.jsonl").mkdir(parents=True)
    assert main(["batch", str(jobs), "--output-dir", str(out), "--model", str(unloadable_model)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: could not write {out / 'manifest.jsonl'}: a folder is where the file should be; choose a file name "
        "and retry"
    )
    (out / "manifest.jsonl").rmdir()
    (out / "taken.png").mkdir()
    result = run_batch(gen, read_jobs(jobs), out, progress=False)
    assert result.written == ["000000"] and result.failed == ["000001"] and gen.rendered == ["a red mug"]
    assert f"job 000001: {out / 'taken.png'} is a folder; give this job another" in capsys.readouterr().err


def test_the_manifest_records_the_guidance_that_acted_as_the_image_does(gen, tmp_path, caplog, capsys,
                                                                         unloadable_model):  # fmt: skip
    """Guidance acts only against a negative prompt: a line's 5.0 without one rendered at 1.0, which the image's
    settings said, while the manifest said 5.0. The batch says so once, not once per job."""
    out = tmp_path / "out"
    plain, negative = {**RED_MUG, "guidance_scale": 5.0}, {**RED_MUG, "guidance_scale": 5.0, "negative_prompt": "blur"}
    unguided = {**RED_MUG, "negative_prompt": "blur", "output": "c.png"}  # the default guidance, 1.0: no guidance
    jobs = _write_jobs(tmp_path / "a.jsonl", plain, {**plain, "output": "b.png"}, negative, unguided)
    with caplog.at_level(logging.WARNING):
        run_batch(gen, read_jobs(jobs), out, progress=False)
    recorded = [(e["guidance_scale"], read_settings(out / e["output"])["guidance_scale"]) for e in _manifest(out)]
    assert recorded == [(1.0, 1.0), (1.0, 1.0), (5.0, 5.0), (1.0, 1.0)] and "guidance" not in caplog.text
    assert [e["negative_prompt"] for e in _manifest(out)] == [None, None, "blur", None]  # what acted
    main(["batch", str(jobs), "--output-dir", str(tmp_path / "o2"), "--model", str(unloadable_model)])
    err = capsys.readouterr().err
    assert "note: 2 jobs give guidance_scale without a negative_prompt; it acts only" in err
    assert "note: 1 job gives a negative_prompt without a guidance_scale above 1; it acts only with one" in err


def test_inputs_edit_refuses_at_once_are_refused_before_the_model_loads(tmp_path, capsys, unloadable_model):
    """A GIF input, a 3000x40 photo and `width: 128` alone for it failed their jobs after the model had loaded (exit
    1), where `qwen-lora edit --image` refuses each before loading (exit 2)."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.gif")
    Image.new("RGB", (3000, 40)).save(tmp_path / "strip.png")
    Image.new("RGB", (300, 30)).save(tmp_path / "long.png")
    edit = {"prompt": "make it red", "num_inference_steps": 1}
    argv = [
        "batch",
        str(tmp_path / "jobs.jsonl"),
        "--output-dir",
        str(tmp_path / "out"),
        "--model",
        str(unloadable_model),
    ]
    _write_jobs(tmp_path / "jobs.jsonl", {**edit, "images": ["in.gif"]})
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'jobs.jsonl'}:1: images[0]: {tmp_path / 'in.gif'}: a GIF image, not JPEG, PNG or WebP: "
        "convert it"
    )
    (tmp_path / "cut.png").write_bytes((tmp_path / "long.png").read_bytes()[:60])  # fails its own job when it renders
    _write_jobs(tmp_path / "jobs.jsonl", {**edit, "images": ["strip.png"]}, {**edit, "images": ["long.png"], "width": 128},
                {**edit, "images": ["long.png"]}, {**edit, "images": ["cut.png"]})  # fmt: skip
    assert main([*argv, "data.resolution=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'jobs.jsonl'}: job 000000: images: image 1 is 3000x40 (aspect 75.0:1)")
    assert "; job 000001: width: 128 keeps the 300x30 image's aspect only with a height of 13 px" in err
    assert "job 000002" not in err and "job 000003" not in err  # 10:1 alone is sizable at 64


def test_a_quality_for_a_png_or_a_feather_without_a_mask_is_said_once_per_setting(tmp_path, capsys, unloadable_model):
    """Both changed nothing and were recorded without a word, where `generate` gives a note and the API an x-warning;
    a quality for a WebP output acts, and a line that does not give one says nothing."""
    jobs = _write_jobs(tmp_path / "a.jsonl", {**RED_MUG, "quality": 50}, {**RED_MUG, "quality": 50, "output": "b.png"},
                       {**RED_MUG, "quality": 50, "output": "c.webp"}, {**RED_MUG, "mask_feather": 3, "id": "d"},
                       {**RED_MUG, "id": "e"})  # fmt: skip
    assert [job.unused for job in read_jobs(jobs)][2:] == [{}, {"mask_feather": "applies only to a masked edit (with "
                                                                               "a mask)"}, {}]  # fmt: skip
    main(["batch", str(jobs), "--output-dir", str(tmp_path / "o"), "--model", str(unloadable_model)])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 2 jobs give quality, which applies to JPEG and WebP outputs; a PNG is lossless",
        "note: 1 job gives mask_feather, which applies only to a masked edit (with a mask)",
    ]


def test_output_names_and_ids_in_any_script_are_written_and_rerun_without_rendering_again(gen, tmp_path):
    """`"output": "Flasche_grün.png"` was refused as not "a plain file name"; so was an id like 瓶子. Decomposed text
    (macOS's, with the ü as u + a combining mark) and scripts written with marks (हिन्दी) are names too, read as NFC."""
    out = tmp_path / "out"
    nfd = unicodedata.normalize("NFD", "Flasche_grün.png")
    jobs = _write_jobs(tmp_path / "a.jsonl", {**RED_MUG, "output": nfd}, {**RED_MUG, "id": "瓶子"},
                       {**RED_MUG, "id": "हिन्दी"})  # fmt: skip
    for _ in range(2):
        result = run_batch(gen, read_jobs(jobs), out, progress=False)
    assert result.skipped == ["000000", "瓶子", "हिन्दी"] and gen.rendered == ["a red mug"] * 3
    assert sorted(p.name for p in out.glob("*.png")) == sorted(["Flasche_grün.png", "瓶子.png", "हिन्दी.png"])
    assert [e["output"] for e in _manifest(out)] == ["Flasche_grün.png", "瓶子.png", "हिन्दी.png"]
    twice = _write_jobs(tmp_path / "b.jsonl", {**RED_MUG, "output": "Mug.png"}, {**RED_MUG, "output": "mug.png"})
    with pytest.raises(InputError, match=re.escape("b.jsonl:2: output 'mug.png' is also written by line 1 as "
                                                   "'Mug.png', one file where case is ignored (macOS, Windows)")):  # fmt: skip
        read_jobs(twice)


@pytest.mark.parametrize(
    "name", ["a\u202egnp.exe", "a\u200db.png", "_x.png", ".x.png", "a b.png", "a\u0308b\u2028.png", "瓶" * 80 + ".png"]
)  # the last: 244 bytes, which the temp name of the write took past the 255 a file name holds
def test_an_output_name_with_a_control_a_separator_or_a_hidden_start_is_refused(tmp_path, name):
    with pytest.raises(
        InputError, match=re.escape(f"output {unicodedata.normalize('NFC', name)!r} must be a plain file name inside")
    ):
        read_jobs(_write_jobs(tmp_path / "a.jsonl", {**RED_MUG, "output": name}))


def test_an_unsafe_id_or_one_given_twice_is_refused_naming_the_line_and_field_up_to_200_bytes(tmp_path):
    folder = tmp_path / "a:b"  # a ':' in the path: the line number is what follows the last one
    folder.mkdir()
    with pytest.raises(InputError) as e:
        read_jobs(_write_jobs(folder / "a.jsonl", {**RED_MUG, "id": "../x"}))
    assert (str(e.value), e.value.field) == (
        f"{folder / 'a.jsonl'}:1: id '../x' must be letters, digits, '.', '_' or '-', a letter or digit first, at most "
        "200 bytes as UTF-8",
        "id",
    )
    with pytest.raises(InputError, match=re.escape("a.jsonl:2: id 'x' is also line 1's id; give each job its own id")):
        read_jobs(_write_jobs(folder / "a.jsonl", {**RED_MUG, "id": "x"}, {**RED_MUG, "id": "x"}))
    assert read_jobs(_write_jobs(tmp_path / "b.jsonl", {**RED_MUG, "id": "é" * 100}))[0].id == "é" * 100  # 200 bytes
    with pytest.raises(InputError, match="at most 200 bytes"):
        read_jobs(_write_jobs(tmp_path / "b.jsonl", {**RED_MUG, "id": "é" * 100 + "x"}))
    with pytest.raises(InputError, match="id '' must be letters"):
        read_jobs(_write_jobs(tmp_path / "b.jsonl", {**RED_MUG, "id": ""}))
