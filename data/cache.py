"""The latent / prompt-embedding cache: encoders run once (`qwen-lora data prepare`), training reads tensors.

Keys are content addresses: a hex digest over everything that changes the tensor, so changing an image, the
model, the bucket/crop or a caption recomputes exactly the entries that depend on it, and nothing else.

    key_for_image(path_or_bytes, bucket, model_id, transform="")   -> latents key
        file content (sha256 of the bytes, not the path) + model id + bucket (w, h) + how the pixels were
        made from the file (crop box, alpha mode, background: anything that is not the bucket, as a string)
    key_for_prompt(text, image_keys, model_id)                     -> embeddings key
        the exact text given to the encoder (template and trigger applied) + the latents keys of the
        reference images encoded with it (edits; [] for text-to-image) + model id
    model_identity(cfg.model)                                      -> the model id used above

Layout under `cache_dir` (one folder can hold several models and resolutions side by side):

    shards/<run>-r<rank>-<n>.safetensors   up to `items_per_shard` entries, written by one process
    shards/<run>-r<rank>-<n>.json          its index: {"keys": {key: kind}}, written after the shard

Tensors in a shard are named `<key>/latents` ([C, 1, h, w]) or `<key>/embeds` ([L, D]) + `<key>/image_pad`
([L] bool); stored in the dtype the encoder produced. A shard and its index are each written atomically and
the index last, so an interrupted `prepare` loses at most the shard in progress and simply resumes: entries
already indexed are skipped. Several processes (`accelerate launch`) write their own shards into the same
folder without coordination; readers merge every index they find. Entries no longer referenced are harmless.

Reading (what `data/dataset.py` calls):

    cache = Cache(cache_dir, model_id)
    cache.has(key) -> bool
    cache.latents(key) -> Tensor [1, C, 1, h, w]
    cache.embeds(key) -> model.PromptEmbeds (batch of 1: embeds [1, L, D], mask None, image_pad [1, L])
    cache.key_for_image(...) / cache.key_for_prompt(...)   the module functions with model_id bound

Tensors are read lazily through `safetensors.safe_open` (memory-mapped), so peak RAM stays flat however large
the cache is: only the small key -> shard map lives in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from qwen_image_lora.io import atomic_path, atomic_write_text

FORMAT_VERSION = 1  # part of every key: bump to invalidate all caches when the stored layout changes


# ------------------------------------------------------------------------------------------------- keys


def model_identity(model_cfg) -> str:
    """The model part of a key: weights (hub id or folder), revision and dtype of the encoders' outputs."""
    return f"{model_cfg.pretrained}@{model_cfg.revision or 'main'}:{model_cfg.dtype}"


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def content_hash(source: str | os.PathLike | bytes) -> str:
    """sha256 of a file's bytes (memoised on path, size and mtime) or of the bytes themselves."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(source).hexdigest()
    path = os.path.abspath(os.fspath(source))
    st = os.stat(path)
    memo_key = (path, st.st_size, st.st_mtime_ns)
    digest = _HASH_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = _HASH_MEMO[memo_key] = h.hexdigest()
    return digest


def _canon(value) -> str:
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, sort_keys=True, default=str)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join([f"v{FORMAT_VERSION}", *parts]).encode()).hexdigest()[:32]


def key_for_image(source: str | os.PathLike | bytes, bucket, model_id: str, transform: str = "") -> str:
    """Key of the latents of one image: its content, the bucket (w, h) it was resized/cropped to, the rest of
    the pixel transform (crop box, alpha handling) as a string, and the model."""
    return "L" + _digest("image", content_hash(source), _canon(bucket), transform, model_id)


def key_for_prompt(text: str, image_keys: list[str] | tuple[str, ...], model_id: str) -> str:
    """Key of the embeddings of `text` encoded together with the reference images whose latents keys are given
    (in prompt order; empty for text-to-image)."""
    return "P" + _digest("prompt", text, _canon(list(image_keys)), model_id)


# ----------------------------------------------------------------------------------------------- writing


class CacheWriter:
    """Buffers up to `items_per_shard` entries in memory and writes them as one shard + index.

    Each process gets its own writer (`rank`); shard names also carry a random run id, so reruns and
    concurrent processes never write to the same file. Use as a context manager, or call `close()`.
    """

    def __init__(self, cache_dir: str | os.PathLike, rank: int = 0, items_per_shard: int = 256):
        self.dir = Path(cache_dir) / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.items_per_shard = items_per_shard
        self.run = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        self._tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[str, str] = {}
        self._n = 0
        self.written = 0  # entries flushed so far

    def put_latents(self, key: str, latents: torch.Tensor) -> None:
        """latents: [1, C, 1, h, w] or [C, 1, h, w]."""
        if latents.dim() == 5:
            latents = latents[0]
        self._put(key, "latents", {"latents": latents})

    def put_embeds(self, key: str, prompt) -> None:
        """prompt: a `model.PromptEmbeds` of batch 1 with no padding (mask None or all true)."""
        embeds, pad = prompt.embeds[0], prompt.image_pad[0].bool()
        if prompt.mask is not None:
            valid = prompt.mask[0].bool()
            embeds, pad = embeds[valid], pad[valid]
        self._put(key, "embeds", {"embeds": embeds, "image_pad": pad})

    def _put(self, key: str, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        if key in self._keys:
            return
        for name, t in tensors.items():
            self._tensors[f"{key}/{name}"] = t.detach().to("cpu").contiguous()
        self._keys[key] = kind
        if len(self._keys) >= self.items_per_shard:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._keys:
            return
        stem = f"{self.run}-r{self.rank:03d}-{self._n:05d}"
        with atomic_path(self.dir / f"{stem}.safetensors") as tmp:
            save_file(self._tensors, str(tmp), metadata={"format": f"qwen-lora-cache-v{FORMAT_VERSION}"})
        # The index goes last: an entry is visible only once its tensors are safely on disk.
        atomic_write_text(self.dir / f"{stem}.json", json.dumps({"version": FORMAT_VERSION, "keys": self._keys}))
        self.written += len(self._keys)
        self._n += 1
        self._tensors, self._keys = {}, {}

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Flush on errors too (KeyboardInterrupt included): what was computed is kept for the resume.
        self.close()


# ----------------------------------------------------------------------------------------------- reading


class Cache:
    """Read-only view of a cache folder (see the module docstring). Cheap to construct; `refresh()` re-reads
    the indexes (e.g. after another process wrote shards)."""

    def __init__(self, cache_dir: str | os.PathLike, model_id: str, max_open: int = 16):
        self.dir = Path(cache_dir)
        self.model_id = model_id
        self.max_open = max_open
        self._where: dict[str, str] = {}  # key -> shard file name
        self._open: OrderedDict[str, object] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        self._where.clear()
        shards = self.dir / "shards"
        if not shards.is_dir():
            return
        for index in sorted(shards.glob("*.json")):
            shard = index.with_suffix(".safetensors")
            if not shard.is_file():
                continue
            try:
                data = json.loads(index.read_text())
            except (OSError, ValueError):
                continue  # a foreign or damaged index: its entries are recomputed
            if data.get("version") != FORMAT_VERSION:
                continue
            for key in data["keys"]:
                self._where[key] = shard.name

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def has(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def key_for_image(self, source, bucket, transform: str = "") -> str:
        return key_for_image(source, bucket, self.model_id, transform)

    def key_for_prompt(self, text: str, image_keys=()) -> str:
        return key_for_prompt(text, image_keys, self.model_id)

    def _handle(self, key: str):
        from safetensors import safe_open

        if key not in self._where:
            raise KeyError(f"{key} is not in the cache at {self.dir}; run `qwen-lora data prepare` first")
        name = self._where[key]
        handle = self._open.get(name)
        if handle is None:
            handle = safe_open(str(self.dir / "shards" / name), framework="pt")
            self._open[name] = handle
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(name)
        return handle

    def latents(self, key: str) -> torch.Tensor:
        """[1, C, 1, h, w]"""
        return self._handle(key).get_tensor(f"{key}/latents").unsqueeze(0)

    def embeds(self, key: str):
        """A `model.PromptEmbeds` of batch 1: embeds [1, L, D], mask None, image_pad [1, L] bool."""
        from qwen_image_lora.model import PromptEmbeds

        h = self._handle(key)
        return PromptEmbeds(h.get_tensor(f"{key}/embeds").unsqueeze(0), None, h.get_tensor(f"{key}/image_pad").unsqueeze(0))

    def close(self) -> None:
        self._open.clear()
