"""Where a model or adapter source is looked for, in-process (the CLI's subprocess tests cannot be traced by the
mutation check): a local path is never taken for a hub id and fails naming what is missing; a hub id goes ahead when
cached and otherwise asks the hub once, each answer one message naming the id and the fix. The hub is a stand-in
object answering like HfApi (never the network); the cache is a temporary folder."""

import re

import httpx
import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.numpy import save_file

from qwen_image_lora import hub
from qwen_image_lora.errors import AdapterError, NotFound


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working folder holding a folder `outputs` and a file `notes.txt`, with an empty hub cache, online."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def _cache(here, repo: str, files=("model_index.json",)):
    snapshot = here / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text("{}")


class _Hub:
    """Answers repo_info as the hub would: with `answer` raised, or quietly; records each request."""

    def __init__(self, answer: Exception | None = None):
        self.answer, self.asked = answer, []

    def __call__(self):  # stands in for the HfApi class: HfApi() is this object
        return self

    def repo_info(self, repo_id, revision=None, timeout=None):
        self.asked.append((repo_id, revision, timeout))
        if self.answer:
            raise self.answer


def _hub_error(kind, message="answer"):
    return kind(message, response=httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api")))


@pytest.fixture
def ask(monkeypatch):
    def install(answer=None) -> _Hub:
        fake = _Hub(answer)
        monkeypatch.setattr(hub, "HfApi", fake)
        return fake

    return install


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("someone/style", True),
        ("some.one/style-v2_1", True),
        ("someone/style/loras/v2.safetensors", True),  # a file inside the repository
        ("someone/style/loras/v2.bin", False),  # three parts without a .safetensors file
        ("someone", False),
        ("someone/", False),
        ("./someone/style", False),
        ("/someone/style", False),
        ("~/style", False),
        (".loras/style", False),
        ("outputs/run", False),  # `outputs` is a folder here: a missing local path, not a repository
        ("notes.txt/style", False),  # nor is a file's name a repository owner
        ("some one/style", False),
    ],
)
def test_a_hub_id_is_owner_slash_repo_that_cannot_be_a_path_here(here, source, expected):
    assert hub.is_hub_id(source) is expected


def test_check_source_passes_what_exists_and_hub_ids_and_names_the_rest(here):
    for source in ("outputs", "notes.txt", here / "outputs", "someone/style"):
        hub.check_source(source)
    (here / "home").mkdir()
    (here / "home" / "a.safetensors").write_text("x")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HOME", str(here / "home"))
        hub.check_source("~/a.safetensors")  # a `~` path is expanded before it is looked for
    with pytest.raises(AdapterError) as local:
        hub.check_source("outputs/nope")
    assert str(local.value) == (
        "outputs/nope: no such adapter file or folder (outputs/ exists here, so it names a local path, not a hub "
        "repository); check the path"
    )
    with pytest.raises(AdapterError) as bare:
        hub.check_source("nope")
    assert str(bare.value) == (
        "nope: no such adapter file or folder (and it is not a hub id like owner/repo); check the path"
    )
    with pytest.raises(AdapterError, match=r"^/nope/x: no such .*\(and it is not a hub id"):
        hub.check_source("/nope/x")  # the root is no "first part that exists here"


def test_a_missing_local_model_folder_is_named_with_its_field(here, ask):
    ask(AssertionError("a local path was taken for a hub id"))
    for source in ("./nope", "/nope/model", "~/nope-model", ".models/qwen", "outputs/model", here / "gone"):
        with pytest.raises(NotFound) as missing:
            hub.check_pretrained(source)
        assert str(missing.value).startswith(f"model.pretrained: {source} does not exist; point it at a ")
        assert str(missing.value).endswith(
            "; point it at a diffusers-format folder (`qwen-lora make-tiny-model DIR` writes a tiny test one) or a hub "
            "id such as Qwen/Qwen-Image-2.1"
        )
        assert missing.value.field == "model.pretrained"


def test_a_local_folder_needs_a_model_index(here):
    with pytest.raises(NotFound, match=r"^model.pretrained: outputs has no model_index.json; point it") as bare:
        hub.check_pretrained("outputs")
    assert bare.value.field == "model.pretrained"
    (here / "outputs" / "model_index.json").write_text("{}")
    hub.check_pretrained("outputs")
    hub.check_pretrained(here / "outputs")


def test_a_cached_hub_model_goes_ahead_without_asking(here, ask):
    _cache(here, "Qwen/Qwen-Image-2.1")
    asked = ask(_hub_error(RepositoryNotFoundError))
    hub.check_pretrained("Qwen/Qwen-Image-2.1")
    assert asked.asked == []
    (here / "hub" / "models--someone--empty" / "snapshots").mkdir(parents=True)  # an interrupted download
    assert not hub.is_cached("someone/empty")


def test_an_uncached_hub_model_asks_the_hub_once_with_its_revision(here, ask):
    asked = ask()
    hub.check_pretrained("Qwen/Qwen-Image-2.1", revision="v2")
    assert asked.asked == [("Qwen/Qwen-Image-2.1", "v2", hub.HUB_TIMEOUT_S)]


def test_offline_an_uncached_hub_model_fails_without_asking(here, ask, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = ask()
    with pytest.raises(hub.HubUnavailable) as offline:
        hub.check_pretrained("Qwen/Qwen-Image-2.1")
    assert asked.asked == []
    assert offline.value.field == "model.pretrained"
    assert str(offline.value) == (
        f"model.pretrained: Qwen/Qwen-Image-2.1 is not in the local Hugging Face cache ({here / 'hub'}) and "
        "HF_HUB_OFFLINE is set, so the hub was not asked; download it first (`hf download Qwen/Qwen-Image-2.1`) or "
        "point model.pretrained at a local diffusers-format folder"
    )


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (_hub_error(GatedRepoError), "is gated on the Hugging Face hub: accept its terms on its page and log in"),
        (_hub_error(RevisionNotFoundError), "is on the Hugging Face hub without a revision 'v9'"),
        (
            _hub_error(RepositoryNotFoundError),
            "is not in the local cache ({cache}) and the Hugging Face hub has no "
            "such repository (a typo, or private: `hf auth login`)",
        ),  # fmt: skip
        (
            ConnectionError("Name or service not known\nmore"),
            "is not in the local cache ({cache}) and the Hugging Face "
            "hub could not be reached (Name or service not known)",
        ),  # fmt: skip
        (TimeoutError(), "could not be reached (TimeoutError)"),
        (OSError("proxy " + "x" * 200), f"could not be reached (proxy {'x' * 114});"),  # the first 120 characters
    ],
)
def test_each_hub_answer_is_one_message_naming_the_model(here, ask, answer, says):
    ask(answer)
    with pytest.raises(hub.HubUnavailable) as refused:
        hub.check_pretrained("someone/model", revision="v9")
    assert str(refused.value).startswith("model.pretrained: someone/model ")
    assert says.format(cache=here / "hub") in str(refused.value)
    assert refused.value.field == "model.pretrained"
    assert refused.value.__cause__ is None and refused.value.__suppress_context__  # one message, no chained trace


def test_an_adapters_hub_check_asks_for_its_repository_and_names_the_adapter(here, ask):
    asked = ask(_hub_error(RepositoryNotFoundError))
    with pytest.raises(AdapterError) as refused:
        hub.check_adapter_hub("someone/style/loras/v2.safetensors")
    assert asked.asked == [("someone/style", None, hub.HUB_TIMEOUT_S)]
    # a mistyped local path reads the same way: the message says both readings
    assert str(refused.value).startswith(
        "someone/style/loras/v2.safetensors: no local file of that name, and as a hub id not in the local cache"
    )
    assert str(refused.value).endswith(
        "download it first (`hf download someone/style`) or give the path of a local .safetensors file"
    )
    _cache(here, "someone/style", ["loras/v2.safetensors"])
    hub.check_adapter_hub("someone/style/loras/v2.safetensors")
    assert len(asked.asked) == 1  # cached now: not asked again


def test_check_adapters_checks_every_source_and_asks_the_hub_only_for_hub_ids(here, ask):
    _cache(here, "someone/cached")
    fake = ask(_hub_error(RepositoryNotFoundError))
    save_file({"a": np.zeros(1, np.float32)}, str(here / "outputs" / "pytorch_lora_weights.safetensors"))
    save_file({"a": np.ones(1, np.float32)}, str(here / "lora.safetensors"))
    hub.check_adapters(["outputs", "lora.safetensors", "someone/cached", "someone/cached/x.safetensors"])
    assert fake.asked == []  # local paths and cached repos: no request
    with pytest.raises(AdapterError, match=r"^outputs/typo: no such adapter file or folder \(outputs/ exists here"):
        hub.check_adapters(["outputs", "outputs/typo", "someone/else"])  # stops at the first bad one, in order
    assert fake.asked == []
    with pytest.raises(AdapterError, match="^someone/else: "):
        hub.check_adapters(["lora.safetensors", "someone/else"])
    assert [repo for repo, *_ in fake.asked] == ["someone/else"]


@pytest.mark.parametrize(("name", "content", "said"), [
    ("lora.bin", b"\x80\x04", "only .safetensors adapters are loaded (pickled .bin/.pt files can run code)"),
    ("empty.safetensors", b"", "not a readable adapter file"),
    ("cut.safetensors", None, "not a readable adapter file"),
])  # fmt: skip
def test_a_local_adapter_that_cannot_be_read_is_refused_before_torch_imports(here, name, content, said):
    """A .bin, an empty or a cut-short file was refused only after the base model had loaded (minutes at 7B)."""
    save_file({"a": np.zeros(64, np.float32)}, str(here / "whole.safetensors"))
    (here / name).write_bytes(content if content is not None else (here / "whole.safetensors").read_bytes()[:-40])
    with pytest.raises(AdapterError, match=rf"^--lora {re.escape(str(here / name))}: {re.escape(said)}"):
        hub.check_adapters(["whole.safetensors", str(here / name)], "--lora")


def test_one_adapter_given_twice_however_spelt_is_refused_naming_both(here):
    """A folder and its file, a copy, or a run's last checkpoint beside its final adapter (the same bytes) loaded
    twice rendered at double strength; the refusal names the option both came from."""
    save_file({"a": np.zeros(4, np.float32)}, str(here / "outputs" / "pytorch_lora_weights.safetensors"))
    (here / "copy.safetensors").write_bytes((here / "outputs" / "pytorch_lora_weights.safetensors").read_bytes())
    save_file({"a": np.ones(4, np.float32)}, str(here / "other.safetensors"))
    hub.check_adapters(["outputs", "other.safetensors"], "--lora")  # two adapters: fine
    hub.check_adapters(["outputs", "copy.safetensors"])  # no option (a config's one adapter): not compared
    for second in ("outputs/pytorch_lora_weights.safetensors", "copy.safetensors"):
        for option, weight in (("--lora", ", at the weight you want (PATH:WEIGHT)"), ("--adapter", "")):
            with pytest.raises(AdapterError) as refused:
                hub.check_adapters(["outputs", "other.safetensors", second], option)
            assert str(refused.value) == (
                f"{option} {second}: the same adapter (the same weights) as {option} outputs; give each adapter "
                f"once{weight}"
            )
            assert refused.value.field == option
    with pytest.raises(AdapterError) as missing:
        hub.check_adapters(["outputs", "nope"], "--adapter")
    assert str(missing.value).startswith("--adapter nope: no such adapter") and missing.value.field == "--adapter"
