"""Finding an adapter's file: a local file, a folder, a hub id against an offline hub cache (never the network), and
the files refused before they are read."""

import re

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from qwen_image_lora.adapter_format import read_adapter, resolve_file
from qwen_image_lora.errors import AdapterError


def test_pickled_adapters_are_refused_unread(tmp_path):
    (tmp_path / "lora.bin").write_bytes(b"not unpickled")
    with pytest.raises(
        AdapterError, match=r"lora\.bin: only \.safetensors adapters are loaded \(pickled .bin/.pt files can run code\)"
    ):
        read_adapter(tmp_path / "lora.bin")


def test_a_folder_resolves_to_its_weights_file_or_lists_what_it_holds(tmp_path):
    expected = (
        rf"^{re.escape(str(tmp_path))}: expected pytorch_lora_weights.safetensors or exactly one .safetensors file"
    )
    with pytest.raises(AdapterError, match=rf"{expected} \(found: none\)$"):
        resolve_file(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    assert resolve_file(tmp_path) == tmp_path / "b.safetensors"
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(AdapterError, match=rf"{expected} \(found: a.safetensors, b.safetensors\)$"):
        resolve_file(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))  # peft's name: no longer ambiguous
    assert resolve_file(tmp_path) == tmp_path / "adapter_model.safetensors"


def test_a_checkpoint_folder_resolves_to_the_adapter_it_holds_one_folder_down(tmp_path):
    """`--lora run/checkpoints/step-000004` named nothing usable (its adapter is in `adapter/`)."""
    step = tmp_path / "checkpoints" / "step-000004"
    (step / "adapter").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(step / "adapter" / "pytorch_lora_weights.safetensors"))
    (step / "optimizer").mkdir()
    assert resolve_file(step) == step / "adapter" / "pytorch_lora_weights.safetensors"
    (tmp_path / "checkpoints" / "step-000008" / "adapter").mkdir(parents=True)
    save_file(
        {"x": torch.zeros(1)},
        str(tmp_path / "checkpoints" / "step-000008" / "adapter" / "pytorch_lora_weights.safetensors"),
    )
    with pytest.raises(
        AdapterError, match=r"\(found: none\); folders holding one: step-000004, step-000008 \(name one\)$"
    ):
        resolve_file(tmp_path / "checkpoints")  # a run's checkpoints: it said only "(found: none)"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """publish(repo, *files): the repo's files in an offline hub cache, where hf_hub_download finds them without the
    network; offline, a repo is listed from its cached snapshot."""

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # whatever the environment says: never the network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no folder named like a repo owner here

    def publish(repo: str, *files: str):
        folder, commit = tmp_path / "hub" / f"models--{repo.replace('/', '--')}", "0" * 40
        for name in files:
            (folder / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
            save_file({"x": torch.zeros(1)}, str(folder / "snapshots" / commit / name))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        return folder / "snapshots" / commit

    return publish


def test_a_hub_id_resolves_to_the_weights_file_the_only_file_or_the_one_named(offline_hub):
    style = offline_hub(
        "someone/style", "adapter_model.safetensors", "pytorch_lora_weights.safetensors", "extra.safetensors"
    )
    assert resolve_file("someone/style") == style / "pytorch_lora_weights.safetensors"  # diffusers' name, then peft's
    one = offline_hub("someone/one", "loras/v2.safetensors", "README.md")
    assert resolve_file("someone/one") == one / "loras/v2.safetensors"
    assert resolve_file("someone/one/loras/v2.safetensors") == one / "loras/v2.safetensors"  # a path inside the repo
    many = offline_hub("someone/many", "a.safetensors", "b.safetensors")
    assert resolve_file("someone/many/b.safetensors") == many / "b.safetensors"
    assert resolve_file("someone/style/adapter_model.safetensors") == style / "adapter_model.safetensors"
    with pytest.raises(
        AdapterError,
        match=re.escape(
            "someone/many: name the file, e.g. someone/many/<file>.safetensors "
            "(found ['a.safetensors', 'b.safetensors'])"
        ),
    ):
        resolve_file("someone/many")
    with pytest.raises(
        AdapterError, match="^someone/gone: not in the local Hugging Face cache .* and HF_HUB_OFFLINE is set"
    ):
        resolve_file("someone/gone")
    with pytest.raises(
        AdapterError, match="^someone/one/loras/v1.safetensors: not in the hub cache, and HF_HUB_OFFLINE"
    ):
        resolve_file("someone/one/loras/v1.safetensors")


def test_offline_a_repo_to_list_is_an_error_naming_the_adapter(monkeypatch, tmp_path):

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        AdapterError,
        match=r"^someone/their-lora: not in the local Hugging Face cache \(.*\) and HF_HUB_OFFLINE is set, so the hub was not asked; download it first \(`hf download someone/their-lora`\) or give the path of a local .safetensors file$",
    ):
        resolve_file("someone/their-lora")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad metadata"])
def test_a_damaged_file_is_refused_by_name(tmp_path, damage):
    file = tmp_path / "lora.safetensors"
    tensors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 32)}
    save_file(tensors, str(file), metadata={"lora_adapter_metadata": "{not json" if damage == "bad metadata" else "{}"})
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:100])
    elif damage == "garbage":
        file.write_bytes(b"\xff" * 64)
    with pytest.raises(
        AdapterError, match=rf"^{re.escape(str(file))}: not a readable adapter file \(.+\); download or export it again"
    ):
        read_adapter(file)
