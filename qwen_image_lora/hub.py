"""A hub id is checked before anything loads: cached, it goes ahead; not cached and offline, unknown or unreachable,
it fails in seconds with one message naming the id, where it was looked for and the fix, instead of minutes of
retries ending in a traceback about a missing config.json."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import repo_folder_name

HUB_TIMEOUT_S = 5.0


class HubUnavailable(FileNotFoundError):
    """A hub id that is neither cached nor fetchable now."""


def is_cached(repo_id: str) -> bool:
    """Some snapshot of the repo is in the local Hugging Face cache."""
    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def check_hub_repo(repo_id: str, *, field: str, fix: str, revision: str | None = None) -> None:
    """Raise HubUnavailable unless `repo_id` is cached or answers on the hub within HUB_TIMEOUT_S (one request,
    no retries)."""
    if is_cached(repo_id):
        return
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailable(f"{field}: {repo_id} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                             f"is set, so the hub was not asked; {fix}")
    try:
        HfApi().repo_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise HubUnavailable(f"{field}: {repo_id} is gated on the Hugging Face hub: accept its terms on its page and "
                             f"log in (`hf auth login`); {fix}") from None
    except RevisionNotFoundError:
        raise HubUnavailable(f"{field}: {repo_id} has no revision {revision!r} on the Hugging Face hub") from None
    except RepositoryNotFoundError:
        raise HubUnavailable(f"{field}: {repo_id} is not in the local cache ({cache}) and the Hugging Face hub has no "
                             f"such repository (a typo, or private: `hf auth login`); {fix}") from None
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean "not reachable now"
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise HubUnavailable(f"{field}: {repo_id} is not in the local cache ({cache}) and the Hugging Face hub could "
                             f"not be reached ({reason}); {fix}") from None
