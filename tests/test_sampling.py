"""One sampling-settings type: every place that renders carries the same knobs and turns them into a request one way."""

import dataclasses
import json

import pytest

from qwen_image_lora.config import EvalConfig, SamplingConfig, ValidationConfig, load_config
from qwen_image_lora.inference.batch import Job, _request, read_jobs
from qwen_image_lora.inference.generator import GenerationRequest
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
])  # fmt: skip
def test_one_set_of_checks_for_every_section(where, bad, message):
    from qwen_image_lora.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"{where}.{bad}"])


def test_a_bad_job_setting_is_named_with_its_line(tmp_path):
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "x", "width": 100}) + "\n")
    with pytest.raises(ValueError, match=r"jobs.jsonl:1: job.width: must be a positive multiple of 32"):
        read_jobs(tmp_path / "jobs.jsonl")
