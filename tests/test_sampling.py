"""One sampling-settings type: every place that renders carries the same knobs and turns them into a request one way."""

import dataclasses
import json
import re

import pytest

from qwen_image_lora.cli import build_parser
from qwen_image_lora.config import Config, ConfigError, load_config
from qwen_image_lora.eval_config import EvalConfig, ValidationConfig
from qwen_image_lora.inference.batch import _request
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.inference.jobs import Job, read_jobs
from qwen_image_lora.inference.requests import request_models
from qwen_image_lora.knobs import SamplingConfig, SettingError
from qwen_image_lora.train.early import schedule_warnings
from qwen_image_lora.train.validation import validation_requests

KNOBS = [f.name for f in dataclasses.fields(SamplingConfig)]
VALUES = dict(negative_prompt="blurry", width=None, height=None, aspect_ratio="16:9", num_inference_steps=7,
              guidance_scale=3.5, seed=11)  # fmt: skip


def test_every_place_that_renders_carries_every_knob():
    assert set(KNOBS) == set(VALUES)  # a new knob must be added here, and then reaches every place below
    for cls in (ValidationConfig, EvalConfig, GenerationRequest, Job):
        assert issubclass(cls, SamplingConfig) and set(KNOBS) <= {f.name for f in dataclasses.fields(cls)}, cls


def test_validation_and_batch_requests_carry_the_settings_unchanged(tmp_path):
    overrides = [f"validation.{k}={json.dumps(v)}" for k, v in VALUES.items()] + ["validation.prompts=[a bottle]"]
    (request,) = validation_requests(load_config(None, overrides)).values()
    assert {k: getattr(request, k) for k in KNOBS} == VALUES and request.prompt == "a bottle"

    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "x", **VALUES}) + "\n")
    (job,) = read_jobs(tmp_path / "jobs.jsonl")
    assert {k: getattr(_request(job, 0, {}), k) for k in KNOBS} == VALUES


@pytest.mark.parametrize("where, bad, message", [
    ("validation", "width=100", "validation.width: must be a positive multiple of 32"),
    ("eval", "aspect_ratio='5:4'", "eval.aspect_ratio: one of 1:1"),
    ("validation", "num_inference_steps=0", "validation.num_inference_steps: must be >= 1"),
    ("validation", "guidance_scale=-1", "validation.guidance_scale: must be >= 0.0"),  # was taken (HTTP refused it)
    # 10^20 steps was a numpy traceback after the model loaded; guidance 1e300 a black image counted as written
    ("validation", "num_inference_steps=100000000000000000000", "validation.num_inference_steps: must be >= 1 and <= 1000"),
    ("eval", "guidance_scale=1e300", r"eval.guidance_scale: must be >= 0.0 and <= 100.0 \(got 1e\+300\)"),
    ("eval", "seed=-1", "eval.seed: must be >= 0 and <= 9223372036854775807"),
])  # fmt: skip
def test_one_set_of_checks_for_every_section(where, bad, message):

    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"{where}.{bad}"])


def test_the_python_api_refuses_what_every_other_edge_refuses(tiny_pipe):
    """`GenerationRequest("")` rendered, and a feather of 65 too, where the CLI, batch lines and HTTP refuse both; an
    edit without its instruction in a config is refused at load time, before a preview or eval render would be."""
    generator = Generator(tiny_pipe, resolution=64)
    for request, message in (
        (GenerationRequest(""), "prompt: give the prompt"),
        (GenerationRequest("x", mask_feather=65), "mask_feather: must be a number from 0 to 64 (got 65)"),
        # rendered 1 step, or crashed inside torch or the scheduler with no field named
        (GenerationRequest("x", num_inference_steps=True), "num_inference_steps: must be a whole number (got True)"),
        (GenerationRequest("x", num_inference_steps=1.5), "num_inference_steps: must be a whole number (got 1.5)"),
        (GenerationRequest("x", seed="3"), "seed: must be a whole number (got '3')"),
        (GenerationRequest("x", width=96.0), "width: must be a whole number (got 96.0)"),
        (GenerationRequest("x", negative_prompt=5), "negative_prompt: must be text (got 5)"),
        (GenerationRequest("x", mask_feather=-1), "mask_feather: must be a number from 0 to 64 (got -1)"),
    ):
        with pytest.raises(SettingError, match=f"^{re.escape(message)}$"):
            generator.check(request)
    generator.check(GenerationRequest("x", mask_feather=64))
    with pytest.raises(ConfigError, match=r"eval.edits\[0\].prompt: give the edit's instruction$"):
        load_config(None, ["eval.edits=[{images: [a.png]}]"])


def test_training_previews_say_once_that_their_guidance_acts_on_nothing():
    """Every preview of every validation round would warn that guidance needs a negative prompt: said once at the
    start (`schedule_warnings`, also what `validate` says), and the previews render without it."""
    cfg = load_config(None, ["validation.guidance_scale=4", "validation.prompts=[a bottle]"])
    (request,) = validation_requests(cfg).values()
    assert request.guidance_scale is None and not request.guidance_unused()
    said = "validation.guidance_scale acts only with a negative_prompt (Qwen-Image 2.1 samples without guidance)"
    assert [w for w in schedule_warnings(cfg) if "guidance" in w] == [f"{said}: previews render without it"]
    acting = load_config(
        None, ["validation.guidance_scale=4", "validation.negative_prompt=blur", "validation.prompts=[a]"]
    )
    assert next(iter(validation_requests(acting).values())).guidance_scale == 4.0 and not schedule_warnings(acting)


@pytest.mark.parametrize("scale", [None, 1.0, 0.5])
def test_a_negative_prompt_without_guidance_is_said_once_and_dropped(scale, tiny_pipe):
    """With the pipeline's default guidance (1.0) or less, a negative prompt rendered the image of none, on every
    edge, and no edge said so; the record kept a guidance that did not act."""
    given = ["validation.negative_prompt=blur", "validation.prompts=[a]"]
    cfg = load_config(None, given + ([] if scale is None else [f"validation.guidance_scale={scale}"]))
    said = "validation.negative_prompt acts only with a guidance_scale above 1 (the pipeline's default is 1.0: no "
    assert [w for w in schedule_warnings(cfg) if "negative" in w] == [f"{said}guidance): previews render without it"]
    (request,) = validation_requests(cfg).values()
    assert (request.negative_prompt, request.guidance_scale) == (None, None)
    generator = Generator(tiny_pipe, resolution=64)
    asked = GenerationRequest("a", negative_prompt="blur", guidance_scale=scale, num_inference_steps=1)
    recorded = generator.describe(asked)
    assert (recorded["negative_prompt"], recorded["guidance_scale"]) == (None, 1.0)
    acting = GenerationRequest("a", negative_prompt="blur", guidance_scale=1.5)
    assert not acting.negative_unused() and generator.describe(acting)["negative_prompt"] == "blur"


def test_a_bad_job_setting_is_named_with_its_line(tmp_path):
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "x", "width": 100}) + "\n")
    with pytest.raises(ValueError, match=r"jobs.jsonl:1: job.width: must be a positive multiple of 32"):
        read_jobs(tmp_path / "jobs.jsonl")
    (tmp_path / "jobs.jsonl").write_text(
        json.dumps({"prompt": "x"}) + "\n" + json.dumps({"prompt": "y", "output": "a.gif"})
    )
    with pytest.raises(ValueError, match=r"jobs.jsonl:2: output format 'a.gif': use .png, .jpg/.jpeg or .webp$"):
        read_jobs(tmp_path / "jobs.jsonl")  # the line was not named


def test_the_cli_flags_and_the_request_models_are_built_from_the_fields():
    """Each knob's name, type, help and limits are declared once (SamplingConfig); the CLI flags and the HTTP request
    models are made from them, the server adding only its own upper bounds."""
    given = {k: v for k, v in VALUES.items() if v is not None}
    args = build_parser().parse_args(["generate", "--prompt", "x", "--output", "o.png",
                                      *(f"--{k.replace('_', '-')}={v}" for k, v in given.items())])  # fmt: skip
    assert {k: getattr(GenerationRequest.from_settings(args, "x"), k) for k in KNOBS} == VALUES

    serve = Config().serve
    image_request, layers_request = request_models(serve)
    body = image_request.model_validate({"prompt": "x", **given})
    assert {k: getattr(GenerationRequest.from_settings(body, "x"), k) for k in KNOBS} == VALUES
    schema = image_request.model_json_schema()["properties"]
    for f in dataclasses.fields(SamplingConfig):
        assert schema[f.name]["description"].startswith(f.metadata["help"]), f.name
    width, steps = schema["width"]["anyOf"][0], schema["num_inference_steps"]["anyOf"][0]
    assert (width["minimum"], width["multipleOf"], width["maximum"]) == (32, 32, serve.max_side)
    assert (steps["minimum"], steps["maximum"]) == (1, serve.max_steps)
    assert schema["aspect_ratio"]["anyOf"][0]["enum"] == ["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"]
    assert set(KNOBS) - set(layers_request.model_fields) == {
        "width",
        "height",
        "aspect_ratio",
    }  # layers keep the input's size
