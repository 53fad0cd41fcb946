"""One error base: what a user can fix ends a command with one line and its exit code, whatever raised it; a bug
(any other exception, a ValueError included) keeps its traceback instead of hiding behind `error:`."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen_image_lora
from qwen_image_lora import cli, hub
from qwen_image_lora import inference as api
from qwen_image_lora.errors import InputError, NotFound, UserError
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.knobs import parse_lora_arg
from qwen_image_lora.train.guards import TrainingStopped
from qwen_image_lora.train.preemption import EXIT_PREEMPTED, Preempted
from qwen_image_lora.train.run_folder import RunFinished

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# Exceptions that are not a user's to fix: an HTTP answer already shaped, a cache entry to rebuild, a run file the
# studio refuses with its own status.
NOT_USER_ERRORS = {"RequestError", "CacheDamaged", "RunFileError", "WriteError"}


PACKAGES = {
    "qwen_image_lora": "qwen_image_lora",
    "data": "qwen_image_lora.data",
    "inference": "qwen_image_lora.inference",
    "train": "qwen_image_lora.train",
    "eval": "qwen_image_lora.eval",
}


def test_every_error_class_of_the_package_is_a_user_error():
    found = []
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                bases = [getattr(b, "id", getattr(b, "attr", "")) for b in getattr(node, "bases", [])]
                if isinstance(node, ast.ClassDef) and any(
                    b.endswith(("Error", "Exception", "Unavailable")) for b in bases
                ):
                    found.append((f"{package}.{path.stem}", node.name))
    strays = [
        f"{module}.{name}"
        for module, name in found
        if name not in NOT_USER_ERRORS
        and not name.startswith("_")
        and not issubclass(getattr(importlib.import_module(module), name), UserError)
    ]
    assert len(found) > 10 and strays == []


def test_the_exit_map():
    assert (InputError("x").exit_code, NotFound("x").exit_code) == (2, 2)
    assert (TrainingStopped("loss is nan").line(), TrainingStopped("x").exit_code) == (
        "training stopped: loss is nan",
        3,
    )
    assert (Preempted("stopped at step 5").line(), Preempted("x").exit_code) == ("stopped at step 5", EXIT_PREEMPTED)
    assert RunFinished("done").exit_code == 0
    assert InputError("a\\nb", "f").field == "f" and isinstance(NotFound("x"), FileNotFoundError)


def test_the_cli_ends_a_user_error_with_its_line_and_code(monkeypatch, capsys):
    class Stopped(UserError):
        exit_code, prefix = 5, "stopped: "

    def refuse(*_):
        raise Stopped("model.pretrained: nope")

    monkeypatch.setattr(hub, "check_pretrained", refuse)
    assert cli.main(["validate", str(DEMO)]) == 5
    assert capsys.readouterr().err.splitlines()[-1] == "stopped: model.pretrained: nope"


def test_a_bug_in_the_cli_keeps_its_traceback(monkeypatch):
    def bug(*_):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(hub, "check_pretrained", bug)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        cli.main(["validate", str(DEMO)])


HEAVY = ("torch", "diffusers", "transformers", "peft")


def _heavy_imports_after(code: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Run `code` in a fresh interpreter; the heavy libraries it imported, and its stderr."""
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, **(env or {})}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1].split(), done.stderr  # the probe's line comes last


def test_the_parser_and_its_help_import_no_heavy_library():
    # Every command registers its flags from light modules: `--help` answered in ~0.2 s, it took ~10 s.
    loaded, _ = _heavy_imports_after("from qwen_image_lora.cli import build_parser\nbuild_parser()")
    assert loaded == []


def test_version_names_ours_and_the_libraries_that_decide_a_run_without_importing_them():
    """A bug report needs the versions; `--version` was refused as an unknown argument."""
    loaded, _ = _heavy_imports_after("from qwen_image_lora.cli import main\ntry:\n    main(['--version'])\n"
                                     "except SystemExit as e:\n    assert e.code == 0")  # fmt: skip
    line = subprocess.run([sys.executable, "-m", "qwen_image_lora.cli", "--version"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60).stdout  # fmt: skip
    assert loaded == [] and line.startswith(
        f"qwen-lora {qwen_image_lora.__version__} (torch {torch.__version__.split('+')[0]}, "
    )
    assert "diffusers " in line and "peft " in line and "accelerate " in line


@pytest.mark.parametrize(
    "argv, named",
    [
        (["generate", "--config", "missing.yaml", "--prompt", "x", "--output", "a.png"], "missing.yaml"),
        (["eval", "--config", str(DEMO), "train.max_stepz=3"], "max_stepz"),
        (["plan", "--config", str(DEMO), "--gpu-memory", "8XB"], "--gpu-memory"),
        (["data", "prepare", "--config", str(DEMO), "lora.targets=nope"], "lora.targets"),
        (["data", "doctor", "missing.yaml"], "missing.yaml: config file not found"),
        # A mistyped --lora path took 10 s (the model's libraries imported first); now about 0.5 s.
        (["generate", "--prompt", "x", "--lora", "/nope/run", "--output", "a.png"], "/nope/run: no such adapter"),
        # a file that is no adapter was refused after the base model had loaded
        (["generate", "--prompt", "x", "--lora", "README.md", "--output", "a.png"], "README.md: only .safetensors"),
        (
            ["layers", "--image", "x.png", "--mask", "auto", "--lora", "/nope/run:0.5", "--output", "o.psd"],
            "/nope/run: no such adapter",
        ),
        (["batch", "j.jsonl", "--lora", "/nope/run", "--output-dir", "o"], "/nope/run: no such adapter"),
        # An uncached hub adapter, offline: it failed only after the base model had loaded.
        (
            ["generate", "--prompt", "x", "--lora", "someone/brand-lora:0.8", "--output", "a.png"],
            "someone/brand-lora: not in the local Hugging Face cache",
        ),
        (
            ["layers", "--image", "x.png", "--mask", "auto", "--lora", "someone/brand-lora", "--output", "o.psd"],
            "someone/brand-lora: not in the local Hugging Face cache",
        ),
        (
            ["batch", "j.jsonl", "--lora", "someone/brand-lora/a.safetensors", "--output-dir", "o"],
            "someone/brand-lora/a.safetensors: no local file of that name, and as a hub id not in the local Hugging",
        ),
        # An uncached hub base model, offline: every command that loads it failed only after ~8 s of imports.
        *(
            (argv, "model.pretrained: someone/base is not in the local Hugging Face cache")
            for argv in (
                ["generate", "--model", "someone/base", "--prompt", "x", "--output", "a.png"],
                ["edit", "--model", "someone/base", "--prompt", "x", "--image", "in.png", "--output", "a.png"],
                ["layers", "--model", "someone/base", "--image", "x.png", "--mask", "auto", "--output", "o.psd"],
                ["batch", "j.jsonl", "--model", "someone/base", "--output-dir", "o"],
                ["serve", "--model", "someone/base", "serve.api_keys_env=QWEN_LORA_TEST_KEYS"],
                ["eval", "--config", str(DEMO), "model.pretrained=someone/base"],
                ["data", "prepare", "--config", str(DEMO), "model.pretrained=someone/base"],
            )
        ),
        (["eval", "--config", str(DEMO), "--adapter", "/nope/run"], "/nope/run: no such adapter"),
        (["serve", "serve.api_keys_file=/nope/keys"], "serve.api_keys_file: /nope/keys does not exist"),
    ],
)
def test_a_bad_config_or_adapter_path_is_refused_before_torch_imports(argv, named, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}  # an empty cache, the hub not asked
    offline["QWEN_LORA_TEST_KEYS"] = "k1"  # serve's keys, so that its model is what it refuses
    loaded, err = _heavy_imports_after(f"from qwen_image_lora.cli import main\nassert main({argv!r}) == 2", offline)
    assert named in err and loaded == []


@pytest.mark.parametrize("flags, named", [
    (["generate", "--prompt", "x", "--width", "100"], "--width: must be a positive multiple of 32"),
    (["generate"], "--prompt: give the prompt"),
    (["generate", "--prompt", "x", "--aspect-ratio", "16:9", "--width", "128"], "--aspect-ratio: give it or --width"),
    (["edit", "--prompt", "x"], "--image: give 1 to 10 input images"),
    (["edit", "--prompt", "x", "--image", "in.png", "--mask", "m.png", "--width", "64"], "--mask: a masked edit keeps"),
    # a missing input file, and layers' output format, took 8-13 s (after the imports)
    (["edit", "--prompt", "x", "--image", "nope.png"], "--image nope.png: does not exist"),
    (["generate", "--from", "nope.png"], "--from nope.png: does not exist"),
    (["generate", "--prompt", "x", "--steps", "0"], "error: --steps: must be >= 1 and <= 1000 (got 0)"),  # was --num-inference-steps
    (["layers", "--image", "in.png", "--mask", "auto"], "a.png: use .psd, .ora or .zip"),
])  # fmt: skip
def test_a_bad_generation_flag_is_refused_before_torch_imports(tiny_model_dir, tmp_path, flags, named):
    """Each took about 8 s (the generator's imports came first), where a mistyped path took half a second."""
    argv = [*flags, "--model", str(tiny_model_dir), "--output", str(tmp_path / "a.png")]
    loaded, err = _heavy_imports_after(f"from qwen_image_lora.cli import main\nassert main({argv!r}) == 2")
    assert named in err and loaded == []


def test_a_bad_jobs_file_is_refused_before_torch_imports(tiny_model_dir, tmp_path):
    """Reading the jobs file imported the generator (torch, peft): 14 s to refuse a line, now under a second."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": 5}\n{"prompt": "x", "width": 100}\n')
    argv = ["batch", str(jobs), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out")]
    loaded, err = _heavy_imports_after(f"from qwen_image_lora.cli import main\nassert main({argv!r}) == 2")
    assert f"2 lines of {jobs} are refused" in err and "job.width: must be" in err and loaded == []


def test_the_python_api_names_load_on_first_use():
    assert api.Generator is Generator and all(getattr(api, name) is not None for name in api.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Generater'"):
        api.Generater  # noqa: B018 - the attribute access is the test


@pytest.mark.parametrize(
    "argv, said",
    [
        (
            ["generate", "--prompt", "x", "--quality", "101", "--output", "a.jpg"],
            "--quality: must be a whole number from 1",
        ),
        (["edit", "--prompt", "x", "--mask-feather", "1000", "--output", "a.png"], "--mask-feather: must be a whole"),
        (
            ["generate", "--prompt", "x", "--lora", "run:nan", "--output", "a.png"],
            "--lora: run:nan: the weight must be",
        ),
        (  # which of several --lora it is
            ["generate", "--prompt", "x", "--lora", "a", "--lora", "run:-100", "--output", "a.png"],
            "--lora: run:-100: the weight must be a number from -4.0 to 4.0 (got -100.0)",
        ),
        (["plan", "--config", str(DEMO), "--references", "11"], "--references: expected 0 to 10, the model's limit"),
        (["plan", "--config", str(DEMO), "--references", "-1"], "--references: expected 0 to 10"),
        (["plan", "--config", str(DEMO), "--gpu-memory", "0GB"], "--gpu-memory: must be more than 0 (got '0GB')"),
        (["plan", "--config", str(DEMO), "--gpu-memory", "-1"], "--gpu-memory: must be more than 0 (got '-1')"),
        (["plan", "--config", str(DEMO), "--gpu-memory", "1e-10"], "--gpu-memory: expected a size such as 80GB"),
        (["plan", "--config", str(DEMO), "--gpu-memory", "0.0000000001"], "--gpu-memory: must be more than 0"),
        (["plan", "--config", str(DEMO), "--gpu-memory", "lots"], "--gpu-memory: expected a size such as 80GB"),
        # -5 was a 33-line traceback from torch; 100000000 traced for 100 s and 9.4 GB before it was killed.
        (["plan", "--config", str(DEMO), "--prompt-tokens", "0"], "--prompt-tokens: expected 1 to 8192 text tokens"),
        (["plan", "--config", str(DEMO), "--prompt-tokens", "100000000"], "--prompt-tokens: expected 1 to 8192"),
    ],
)
def test_the_cli_refuses_what_the_server_refuses(argv, said, capsys):
    """One home for the limits outside SamplingConfig (knobs.py): --quality 101 and --mask-feather 1000 were taken,
    a NaN --lora weight wrote a black, transparent image, and plan took -1 or 11 reference images."""
    try:
        code = cli.main([*argv, "model.pretrained=/nonexistent"])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2 and said in capsys.readouterr().err


def test_validate_checks_a_config_without_importing_torch(tmp_path):
    """`validate` is the seconds-long check: it took 8 s, importing diffusers for the cache folder's check and peft
    through the run folder's; now it imports none of them, and still reads the data and names a missing edit input."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")  # all a local model folder needs to pass `check_pretrained`
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"")  # validate lists items; it decodes no image
    (data / "a.txt").write_text("a qwnbrand bottle")
    base = ["validate", str(DEMO), f"model.pretrained={model}", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}", "validation.edits=[]", "eval.edits=[]"]  # fmt: skip
    loaded, err = _heavy_imports_after(f"from qwen_image_lora.cli import main\nassert main({base!r}) == 0")
    assert loaded == [], err
    loaded, err = _heavy_imports_after(
        f"from qwen_image_lora.cli import main\nassert main({[*base, 'lora.init_from=/nope/run']!r}) == 2"
    )
    assert "/nope/run: no such adapter file or folder" in err and loaded == []  # it said OK; training failed late
    edit = f"eval.edits=[{{images: [{tmp_path / 'gone.png'}], prompt: recolour}}]"
    loaded, err = _heavy_imports_after(f"from qwen_image_lora.cli import main\nassert main({[*base, edit]!r}) == 2")
    assert f"eval.edits[0].images: {tmp_path / 'gone.png'} does not exist" in err and loaded == []


def test_a_lora_weight_that_is_not_a_number_is_named(tmp_path, monkeypatch, capsys):
    """`--lora run:abc` said `run:abc: no such adapter file or folder`, while `run` was right there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    assert cli.main(["generate", "--prompt", "x", "--lora", "run:abc", "--output", "a.png"]) == 2
    said = capsys.readouterr().err.splitlines()[-1]
    assert said == "error: --lora: run:abc: the weight after ':' must be a number (got 'abc')"
    (tmp_path / "run:abc").mkdir()  # a folder whose name has a colon is a path, as before
    assert parse_lora_arg("run:abc") == ("run:abc", 1.0) and parse_lora_arg("run:0.5") == ("run", 0.5)
