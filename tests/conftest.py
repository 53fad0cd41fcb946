"""Shared fixtures: the tiny Qwen-Image-2.1 checkpoint and the sample data, built once per test session
through the same builders the demo uses, and loaded through the same `from_pretrained` path as a hub id; and a
guard that keeps every test off the network."""

from __future__ import annotations

# First: the package's filters for library noise must be in place before torch, diffusers and peft load (under
# pytest-xdist a worker's import-time lines reach the console).
import qwen_image_lora  # noqa: F401

# isort: split
import errno
import ipaddress
import os
import socket
from pathlib import Path

import pytest
import torch
from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from qwen_image_lora.config import CACHE_ENV
from qwen_image_lora.model import load_pipeline
from qwen_image_lora.sample_data import make_sample_data
from qwen_image_lora.tiny_model import make_tiny_model
from tests.unchosen import draw_run_seed

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    draw_run_seed()


@pytest.fixture(scope="module", autouse=True)
def module_data_cache(tmp_path_factory):
    """The default data cache of module-scoped fixtures (a run trained once per file): see `data_cache`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("data-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def wandb_home(tmp_path_factory):
    """W&B's staging copies, cache and settings (which default to ~/.local/share, ~/.cache and ~/.config) in a
    temporary folder: no test writes the user's home."""
    folder = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(folder / name.lower()))
        yield folder


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    """Each test's own default data cache (`data.cache_dir`, through $QWEN_LORA_CACHE, which the processes a test
    starts inherit): no test writes the user's ~/.cache, or finds what another test encoded and screened."""
    folder = tmp_path_factory.mktemp("data-cache")
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen-image-2.1")


@pytest.fixture(scope="session")
def unloadable_model(tmp_path_factory) -> Path:
    """Passes the commands' quick model check (a folder with a model_index.json) and fails to load: an error a
    command gives with it came before the model load, and is not about the model."""
    folder = tmp_path_factory.mktemp("models") / "unloadable"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory):

    return make_sample_data(tmp_path_factory.mktemp("data") / "sample-data")


@pytest.fixture(scope="session")
def make_adapter():
    """`make_adapter(model_dir, out, std, seed=0)` writes a rank-4 attention LoRA as `save_adapter` saves it;
    std = 0 gives lora_B = 0 (a no-op adapter)."""
    return _make_adapter


def _make_adapter(model_dir: Path, out: Path, std: float, seed: int = 0) -> Path:

    transformer = QwenImage21Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0.0, std) if std else p.data.zero_()
    QwenImage21Pipeline.save_lora_weights(
        str(out),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name="pytorch_lora_weights.safetensors",
        safe_serialization=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """Loaded once; tests must not leave adapters or other state on it."""

    return load_pipeline(tiny_model_dir, dtype="float32")


def _is_loopback(address) -> bool:
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:  # a host name: tests connect to addresses, never to names that need resolving
        return False


@pytest.fixture(autouse=True)
def no_outside_network(monkeypatch):
    """Every test stays on loopback: a socket connect to any other address is refused AND fails the test, even when
    the code under test catches the error (a fetch that fails reads as a refusal), so a regression in the URL guard
    can never send a request to 169.254.169.254 or anywhere else from CI. Yields the list of refused addresses."""
    refused = []

    def guarded(real):
        def connect(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
                refused.append(address[:2])
                raise OSError(errno.ENETUNREACH, f"test socket guard: no connections outside loopback ({address[0]})")
            return real(self, address)

        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))
    yield refused
    if refused:
        pytest.fail(f"the test opened sockets to non-loopback addresses: {refused}")
