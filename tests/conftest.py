"""Shared fixtures: the tiny Qwen-Image-2.1 checkpoint and the sample data, built once per test session
through the same builders the demo uses, and loaded through the same `from_pretrained` path as a hub id."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from qwen_image_lora.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen-image-2.1")


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory):
    from qwen_image_lora.sample_data import make_sample_data

    return make_sample_data(tmp_path_factory.mktemp("data") / "sample-data")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """Loaded once; tests must not leave adapters or other state on it."""
    from qwen_image_lora.model import load_pipeline

    return load_pipeline(tiny_model_dir, dtype="float32")
