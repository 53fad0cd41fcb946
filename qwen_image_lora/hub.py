"""A hub id is checked before anything loads: cached, it goes ahead; not cached and offline, unknown or unreachable,
it fails in seconds with one message naming the id, where it was looked for and the fix, instead of minutes of
retries ending in a traceback about a missing config.json."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import repo_folder_name

from qwen_image_lora.errors import AdapterError, NotFound

HUB_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(/.+\.safetensors)?")


class HubUnavailable(NotFound):
    """A hub id that is neither cached nor fetchable now."""


def is_cached(repo_id: str) -> bool:
    """Some snapshot of the repo is in the local Hugging Face cache."""
    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


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


def is_hub_id(source: str) -> bool:
    """`owner/repo` or `owner/repo/file.safetensors` that cannot be a local path: not `.`, `/` or `~`-rooted, and its
    first part is no folder here (so a typo in `outputs/run` is a missing local path, not a repository)."""
    return (
        bool(_HUB_ID.fullmatch(source))
        and not source.startswith((".", "/", "~"))
        and not Path(source.split("/")[0]).exists()
    )


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
