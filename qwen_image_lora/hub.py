"""A hub id is checked before anything loads: cached, it goes ahead; not cached and offline, unknown or unreachable,
it fails in seconds with one message naming the id, where it was looked for and the fix, instead of minutes of
retries ending in a traceback about a missing config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import repo_folder_name
from safetensors import SafetensorError, safe_open

from qwen_image_lora.errors import AdapterError, NotFound
from qwen_image_lora.io import content_hash
from qwen_image_lora.run_layout import FINAL_ADAPTER

TRANSFORMER_SUBFOLDER = "transformer"
WEIGHT_NAMES = (FINAL_ADAPTER, "adapter_model.safetensors")  # diffusers' adapter file name, then peft's

HUB_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(/.+\.safetensors)?")


class HubUnavailable(NotFound):
    """A hub id that is neither cached nor fetchable now."""


def _cache_folder(repo_id: str) -> Path:
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def is_cached(repo_id: str) -> bool:
    """Some snapshot of the repo is in the local Hugging Face cache."""
    snapshots = _cache_folder(repo_id) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def cached_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit the local cache holds for `revision` (a branch or tag name); the revision itself when the cache
    names none (a commit hash given as the revision, or nothing downloaded yet)."""
    try:
        return (_cache_folder(repo_id) / "refs" / (revision or "main")).read_text().strip()
    except (OSError, ValueError):
        return revision or "main"


def check_hub_repo(repo_id: str, *, head: str, fix: str, field: str | None = None, revision: str | None = None) -> None:
    """Raise HubUnavailable unless `repo_id` is cached or answers on the hub within HUB_TIMEOUT_S (one request,
    no retries). `head` opens the message ("model.pretrained: ORG/NAME is", "ORG/NAME:")."""
    if is_cached(repo_id):
        return
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailable(
            f"{head} not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, so the "
            f"hub was not asked; {fix}",
            field,
        )
    try:
        HfApi().repo_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise HubUnavailable(
            f"{head} gated on the Hugging Face hub: accept its terms on its page and log in (`hf auth login`); {fix}",
            field,
        ) from None
    except RevisionNotFoundError:
        raise HubUnavailable(f"{head} on the Hugging Face hub without a revision {revision!r}", field) from None
    except RepositoryNotFoundError:
        raise HubUnavailable(
            f"{head} not in the local cache ({cache}) and the Hugging Face hub has no such "
            f"repository (a typo, or private: `hf auth login`); {fix}",
            field,
        ) from None
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean "not reachable now"
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise HubUnavailable(
            f"{head} not in the local cache ({cache}) and the Hugging Face hub could not be reached ({reason}); {fix}",
            field,
        ) from None


def check_adapter_hub(hub_id: str) -> None:
    """Raise AdapterError naming the adapter unless its repository (`owner/repo[/file.safetensors]`) is cached or
    answers on the hub now."""
    repo = "/".join(hub_id.split("/")[:2])
    # `owner/repo/file.safetensors` is also how a mistyped local path reads: say both readings
    head = f"{hub_id}: no local file of that name, and as a hub id" if hub_id.endswith(".safetensors") else f"{hub_id}:"
    try:
        check_hub_repo(
            repo,
            head=head,
            fix=f"download it first (`hf download {repo}`) or give the path of a local .safetensors file",
        )
    except HubUnavailable as e:
        raise AdapterError(str(e)) from None


def is_hub_id(source: str) -> bool:
    """`owner/repo` or `owner/repo/file.safetensors` that cannot be a local path: not `.`, `/` or `~`-rooted, and its
    first part is no folder here (so a typo in `outputs/run` is a missing local path, not a repository)."""
    # The pattern already refuses a `/` or `~` start; `.` is a name character, so `./x` and `.x/y` are refused here.
    return bool(_HUB_ID.fullmatch(source)) and not source.startswith(".") and not Path(source.split("/")[0]).exists()


def check_adapter_file(file: Path) -> None:
    """A local adapter's weights file is a .safetensors file whose header reads (numpy, not torch: the commands ask
    this before importing torch; a .bin, an empty or a cut-short file was found after the base model had loaded)."""
    if file.suffix != ".safetensors":
        raise AdapterError(f"{file}: only .safetensors adapters are loaded (pickled .bin/.pt files can run code)")
    try:
        with safe_open(str(file), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{file}: not a readable adapter file ({e}); download or export it again") from e


def check_source(source: str | Path) -> None:
    """Fail now, naming the path, when `source` is neither a local file or folder nor clearly a hub id: callers run
    this before loading a model, so a typo costs seconds, not a model load and a round of hub retries."""
    if Path(source).expanduser().exists() or is_hub_id(str(source)):
        return
    first = str(source).split("/")[0]
    why = (
        f"{first}/ exists here, so it names a local path, not a hub repository"
        if first and "/" in str(source) and Path(first).expanduser().exists()  # not "/..." (first is "")
        else "and it is not a hub id like owner/repo"
    )
    raise AdapterError(f"{source}: no such adapter file or folder ({why}); check the path")


def check_adapters(sources, option: str | None = None) -> None:
    """Each adapter is a local file or folder, or a hub id that is cached or answers now: the commands ask this before
    importing torch, so a typo or an uncached repo offline fails in about a second, not after the base model loads.
    With `option` (the flag that gave them: --lora, --adapter) an error starts with it, and an adapter given twice
    however it is spelt is refused: generate loaded it twice at double strength, eval scored it twice."""
    seen: dict = {}
    for source in map(str, sources):
        try:
            check_source(source)
            if is_hub_id(source):
                check_adapter_hub(source)
            else:
                check_adapter_file(local_weights_file(source))
        except AdapterError as e:
            if option is None:
                raise
            raise AdapterError(f"{option} {e}", option) from None
        if option is None:
            continue
        if (key := _weights_file(source)) in seen:  # loaded twice it rendered at double strength
            weight = ", at the weight you want (PATH:WEIGHT)" if option == "--lora" else ""
            raise AdapterError(f"{option} {source}: the same adapter (the same weights) as {option} {seen[key]}; "
                               f"give each adapter once{weight}", option)  # fmt: skip
        seen[key] = source


def _weights_file(source: str):
    """An adapter as one key however it is spelt: a local adapter's weights by their bytes' sha256 (a run or checkpoint
    folder, its adapter folder, a folder holding one file, the file, a link to it, a copy of it, or the run's last
    checkpoint, which holds the final adapter's bytes, are one adapter), or the hub id."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    try:
        found = local_weights_file(path)
    except AdapterError:  # a folder of several files: loading it says so
        return path.stat().st_dev, path.stat().st_ino
    try:
        return content_hash(found)  # memoised: the settings written into each image hash it again
    except OSError:  # unreadable: loading it says so
        return found.stat().st_dev, found.stat().st_ino


def local_weights_file(source: str | Path) -> Path:
    """The .safetensors file a local adapter path names: the file itself, or in a folder diffusers' or peft's file,
    else its only .safetensors file, else the one folder below that holds one (a checkpoint's `adapter/`)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():  # a device or a pipe (/dev/zero behind a symlink): nothing to read an adapter from
        raise AdapterError(f"{path}: not a file or folder; give a .safetensors file or a folder holding one")
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    # A training checkpoint (`checkpoints/step-N/`) keeps its adapter one folder down, a run's `checkpoints/` two.
    inner = [d for d in sorted(path.iterdir()) if d.is_dir() and _holds_weights(d, depth=2)]
    if not found and len(inner) == 1:
        return local_weights_file(inner[0])
    listed = ", ".join(p.name for p in found) or "none"
    hint = f"; folders holding one: {', '.join(d.name for d in inner)} (name one)" if inner else ""
    raise AdapterError(f"{path}: expected {FINAL_ADAPTER} or exactly one .safetensors file (found: {listed}){hint}")


def _holds_weights(folder: Path, depth: int) -> bool:
    below = depth > 1 and any(d.is_dir() and _holds_weights(d, depth - 1) for d in folder.iterdir())
    return below or any((folder / n).is_file() for n in WEIGHT_NAMES)


def check_pretrained(pretrained: str | Path, revision: str | None = None, field: str = "model.pretrained") -> None:
    """Raise FileNotFoundError naming `field` when it looks like a local folder but is not a model, or is
    a hub id that is neither cached nor reachable (in seconds, not after minutes of retries)."""
    source = str(pretrained)
    if not _is_local(source):
        check_hub_repo(
            source,
            head=f"{field}: {source} is",
            field=field,
            revision=revision,
            fix=f"download it first (`hf download {source}`) or point {field} at a local diffusers-format folder",
        )
        return
    hint = (
        "point it at a diffusers-format folder (`qwen-lora make-tiny-model DIR` writes a tiny test one) "
        "or a hub id such as Qwen/Qwen-Image-2.1"
    )
    if not Path(source).expanduser().exists():
        raise NotFound(f"{field}: {source} does not exist; {hint}", field)
    if not (Path(source).expanduser() / "model_index.json").is_file():
        raise NotFound(f"{field}: {source} has no model_index.json; {hint}", field)


def transformer_config_json(pretrained: str | None, revision: str | None = None) -> dict | None:
    """The transformer's `config.json` from a local model folder or the hub cache, never fetched; None when neither
    holds it."""
    if not pretrained:
        return None
    local = Path(pretrained).expanduser() / TRANSFORMER_SUBFOLDER / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        path = hf_hub_download(
            pretrained, f"{TRANSFORMER_SUBFOLDER}/config.json", revision=revision, local_files_only=True
        )
    except Exception:  # not cached, or not a hub id
        return None
    return json.loads(Path(path).read_text())


def _is_local(source: str) -> bool:
    """A path, not a hub id: it exists, starts like a path, or its first part is a local folder (outputs/nope)."""
    return Path(source).exists() or source.startswith((".", "/", "~")) or Path(source.split("/")[0]).is_dir()
