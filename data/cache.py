"""The latent / prompt-embedding cache: encoders run once (`qwen-lora data prepare`), training reads tensors.

Keys are content addresses: a hex digest over everything that changes the tensor, so changing an image, the
model, the bucket/crop or a caption recomputes exactly the entries that depend on it, and nothing else.

    key_for_image(path_or_bytes, bucket, model_id, transform="")   -> latents key
        file content (sha256 of the bytes, not the path) + model id + bucket/crop (a `buckets.Transform` or
        (w, h)) + the rest of how pixels are made from the file (alpha mode and background) as a string
    key_for_prompt(text, image_keys, model_id)                     -> embeddings key
        the exact text given to the encoder (template and trigger applied) + the latents keys of the
        reference images encoded with it (edits; [] for text-to-image) + model id
    model_identity(cfg.model)                                      -> the model id used above

`data/dataset.py`'s `SampleEncoder` computes every key through these two functions, for training and for
`prepare` alike, so what prepare writes is exactly what training looks up.

Layout under `cache_dir` (by default one folder every run shares, `config.default_cache_dir`, outside any run
folder; it holds several data sets, models and resolutions side by side):

    shards/<run>-r<rank>-<n>.safetensors   up to `items_per_shard` entries, written by one process
    shards/<run>-r<rank>-<n>.json          its index, written after the shard: {"keys": {key: [tensor names]},
                                           "sha256": {key: digest of the entry's tensors}, "bytes": shard size}
    damaged/                               shards `prepare` found cut short, moved aside for inspection
    verdicts/<data>-<digest>/              the doctor's and prepare's verdicts on one data set (`report.verdicts_dir`)
    hf-images/                             `hf` dataset images held as bytes, written once as files (`sources.py`)

An entry is a small dict of tensors, stored as `<key>/<name>`: latents {"latents": [1, C, 1, h, w]};
prompts {"embeds": [1, L, D], "image_pad": [1, L] bool, optional "mask": [1, L]}; in the encoder's dtype. A
shard and its index are each written atomically, the index last, so an interrupted `prepare` loses at most the
shard in progress and simply resumes: indexed entries are skipped. Several processes (`accelerate launch`, or two
runs at once) write their own shards into the same folder without coordination (`<run>` is random per writer);
readers merge every index they find.
Entries that are no longer referenced (an old caption) stay on disk and are harmless.

Verified: a shard whose size differs from its index (cut short, or grown) is named in a warning and none of
its entries are used; every entry read is checked against its sha256, so overwritten bytes are never trained
on: a damaged entry is named (shard and key) and treated as missing (re-encoded when the encoders are loaded,
else a `CacheDamaged` error saying to run `prepare`). `verify()` (run by `prepare`) reads everything once and
`repair=True` drops damaged entries from their index, so `prepare` re-encodes exactly those.

API (`Cache` implements the `get`/`put` protocol `SampleEncoder` uses):

    cache = Cache(cache_dir, model_id)          # read-only view; writable=True, rank=... to add entries
    cache.has(key) -> bool                      # also `key in cache`
    cache.get(key) -> dict[str, Tensor] | None
    cache.latents(key) -> Tensor [1, C, 1, h, w]
    cache.embeds(key) -> model.PromptEmbeds     # batch of 1
    cache.put(key, tensors); cache.flush()      # writable caches: buffered, one shard per items_per_shard;
                                                # optional=True (training): an unwritable folder (read-only, no
                                                # permission) is one warning, and entries stay in memory
    cache.verify(repair=False, keys=None) -> {shard: [damaged keys]}
    cache.key_for_image(...) / cache.key_for_prompt(...)   the module functions with model_id bound

Tensors are read lazily through `safetensors.safe_open` (memory-mapped), so peak RAM stays flat however large
the cache is: only the key -> shard map and at most `items_per_shard` pending entries live in memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_image_lora.hub import cached_commit
from qwen_image_lora.io import (
    atomic_path,
    atomic_write_text,
    content_hash,
    writing_to,
)
from qwen_image_lora.model import PromptEmbeds

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # part of every key: bump to invalidate all caches when the stored layout changes (2: checksums)


# A folder this process may not write (not a full one): an `optional` cache goes on without writing.
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class CacheDamaged(KeyError):
    """A cache entry failed its checksum or could not be read; the message names the shard."""

    def __str__(self) -> str:
        return str(self.args[0])


# ------------------------------------------------------------------------------------------------- keys


ENCODER_PARTS = ("vae", "text_encoder", "processor")  # what makes latents and embeddings from a model folder


def model_identity(model_cfg) -> str:
    """The model part of a key: weights (hub id or folder), revision and dtype of the encoders' outputs, and which
    version of the encoders' files those are (`_encoders_version`)."""
    name = f"{model_cfg.pretrained}@{model_cfg.revision or 'main'}"
    return f"{name}:{model_cfg.dtype}:{_encoders_version(model_cfg.pretrained, model_cfg.revision)}"


def _encoders_version(pretrained: str, revision: str | None) -> str:
    """A local folder's encoder files by name, size and modification time; a hub id's cached commit for its revision.
    The name alone kept serving the old model's latents and embeddings after its files were replaced in place (a
    newer download into the same folder)."""
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        files = sorted(f for part in ENCODER_PARTS for f in (folder / part).rglob("*") if f.is_file())
        return _digest(*(f"{f.relative_to(folder)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files))
    return cached_commit(pretrained, revision)


def _canon(value) -> str:
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, sort_keys=True, default=str)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join([f"v{FORMAT_VERSION}", *parts]).encode()).hexdigest()[:32]


def entry_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over an entry's tensors (name, dtype, shape and raw bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def key_for_image(source: str | os.PathLike | bytes, bucket, model_id: str, transform: str = "") -> str:
    """Key of the latents of one image: its content, the bucket (w, h) it was resized/cropped to, the rest of
    the pixel transform (crop box, alpha handling) as a string, and the model."""
    return "L" + _digest("image", content_hash(source), _canon(bucket), transform, model_id)


def key_for_prompt(text: str, image_keys: list[str] | tuple[str, ...], model_id: str) -> str:
    """Key of the embeddings of `text` encoded together with the reference images whose latents keys are given
    (in prompt order; empty for text-to-image)."""
    return "P" + _digest("prompt", text, _canon(list(image_keys)), model_id)


# ----------------------------------------------------------------------------------------------- the cache


class Cache:
    """A cache folder (see the module docstring). Read-only unless `writable`; `refresh()` re-reads the indexes
    (e.g. after other processes wrote shards)."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        model_id: str = "",
        *,
        writable: bool = False,
        rank: int = 0,
        items_per_shard: int = 256,
        max_open: int = 16,
        optional: bool = False,
    ):
        self.dir = Path(cache_dir)
        self.shards = self.dir / "shards"
        self.model_id = model_id
        self.writable, self.rank, self.items_per_shard, self.max_open = writable, rank, items_per_shard, max_open
        # Training's cache only saves the next run time: a folder it may not write keeps entries in memory instead.
        self.optional, self.refused = optional, False
        self.run = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"  # this writer's shard names
        # key -> its stored copies, newest first: (shard file, tensor names, sha256)
        self._where: dict[str, list[tuple[str, tuple[str, ...], str]]] = {}
        self._open: OrderedDict[str, object] = OrderedDict()
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._n_shards = 0
        self.written = 0  # entries this object flushed to disk
        if writable:
            with writing_to(self.shards):  # a file in the way or a read-only disk, named
                self.shards.mkdir(parents=True, exist_ok=True)
        self.refresh()

    # ------------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Read every index; a shard whose size disagrees with its index is named and left out."""
        self._where.clear()
        self.damaged: dict[str, str] = {}  # shard file -> what is wrong with it (named once in a warning)
        self._unusable: dict[str, list[str]] = {}  # shards left out whole -> the keys their index lists
        if not self.shards.is_dir():
            return
        for index in sorted(self.shards.glob("*.json")):
            shard = index.with_suffix(".safetensors")
            if not shard.is_file():
                continue
            try:
                data = json.loads(index.read_text())
                if data.get("version") != FORMAT_VERSION:
                    continue  # another format: its keys differ, so nothing would match anyway
                keys, digests, size = data["keys"], data["sha256"], data["bytes"]
            except (OSError, ValueError, KeyError, TypeError):
                self._unusable[shard.name] = []
                self._damage(shard.name, f"its index {index.name} cannot be read")
                continue
            if shard.stat().st_size != size:
                self._unusable[shard.name] = list(keys)
                self._damage(
                    shard.name, f"{shard.stat().st_size} bytes where its index says {size} (cut short or overwritten)"
                )
                continue
            for key, names in keys.items():
                # Newest first: a key re-encoded after damage is read before its damaged copy.
                self._where.setdefault(key, []).insert(0, (shard.name, tuple(names), digests[key]))

    def _damage(self, shard: str, why: str) -> None:
        if shard not in self.damaged:
            self.damaged[shard] = why
            logger.warning(
                "cache shard %s is damaged: %s; its entries are re-encoded (or run `qwen-lora data prepare`)",
                self.shards / shard,
                why,
            )

    def __len__(self) -> int:
        return len(self._where.keys() | self._pending.keys())

    def __contains__(self, key: str) -> bool:
        return key in self._where or key in self._pending

    def has(self, key: str) -> bool:
        return key in self

    def keys(self) -> list[str]:
        return list(self._where.keys() | self._pending.keys())

    def key_for_image(self, source, bucket, transform: str = "") -> str:
        return key_for_image(source, bucket, self.model_id, transform)

    def key_for_prompt(self, text: str, image_keys=()) -> str:
        return key_for_prompt(text, image_keys, self.model_id)

    def _handle(self, shard: str):

        handle = self._open.get(shard)
        if handle is None:
            handle = safe_open(str(self.shards / shard), framework="pt")
            self._open[shard] = handle
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return handle

    def _read(self, key: str, copy: tuple[str, tuple[str, ...], str]) -> dict[str, torch.Tensor] | None:
        """One stored copy of an entry if it reads back and matches its sha256; else None (the shard is named)."""
        shard, names, digest = copy
        try:
            handle = self._handle(shard)
            tensors = {name: handle.get_tensor(f"{key}/{name}") for name in names}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad file
            self._damage(shard, f"cannot read entry {key}: {e}")
            return None
        if entry_digest(tensors) != digest:
            self._damage(shard, f"entry {key} fails its checksum")
            return None
        return tensors

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, checked against their sha256; None if absent. Damaged copies are forgotten;
        raises `CacheDamaged` (naming the shard) when no intact copy is left."""
        if key in self._pending:
            return self._pending[key]
        copies = self._where.get(key)
        while copies:
            tensors = self._read(key, copies[0])
            if tensors is not None:
                return tensors
            shard = copies.pop(0)[0]
            if not copies:
                del self._where[key]
                raise CacheDamaged(
                    f"cache entry {key} in {self.shards / shard} is damaged ({self.damaged[shard]}); run `qwen-lora data prepare` to re-encode it"
                )
        return None

    def verify(self, repair: bool = False, keys: set[str] | None = None) -> dict[str, list[str]]:
        """Read and check every stored copy (of `keys` only, when given: a shared cache holds other data sets'
        entries too); returns {shard: damaged keys} (a shard left out whole lists all its keys). Damaged copies are
        forgotten, so their keys count as missing unless another copy is intact. `repair` rewrites each damaged
        shard's index without those keys, and moves a shard left out whole, with its index, into
        `<cache_dir>/damaged/`. Two runs repairing at once do no harm: a file another one moved is skipped, and a
        rewrite lost to theirs leaves a damaged entry listed, which every read checks and the next verify drops."""
        bad = {shard: list(names) for shard, names in self._unusable.items()}
        for key, copies in list(self._where.items()):
            if keys is not None and key not in keys:
                continue
            for copy in list(copies):
                if self._read(key, copy) is None:
                    bad.setdefault(copy[0], []).append(key)
                    copies.remove(copy)
            if not copies:
                del self._where[key]
        if repair:
            for shard, damaged in bad.items():
                index = (self.shards / shard).with_suffix(".json")
                with contextlib.suppress(FileNotFoundError):
                    if shard in self._unusable:
                        (self.dir / "damaged").mkdir(exist_ok=True)
                        for f in (index, self.shards / shard):
                            os.replace(f, self.dir / "damaged" / f.name)
                        continue
                    data = json.loads(index.read_text())
                    for field in ("keys", "sha256"):
                        data[field] = {k: v for k, v in data[field].items() if k not in set(damaged)}
                    atomic_write_text(index, json.dumps(data))
            self._unusable = {}
        return bad

    def _require(self, key: str) -> dict[str, torch.Tensor]:
        hit = self.get(key)
        if hit is None:
            raise KeyError(f"{key} is not in the cache at {self.dir}; run `qwen-lora data prepare` first")
        return hit

    def latents(self, key: str) -> torch.Tensor:
        """[1, C, 1, h, w]"""
        return self._require(key)["latents"]

    def embeds(self, key: str):
        """A `model.PromptEmbeds` of batch 1: embeds [1, L, D], mask [1, L] or None, image_pad [1, L] bool."""

        hit = self._require(key)
        return PromptEmbeds(hit["embeds"], hit.get("mask"), hit["image_pad"])

    # ------------------------------------------------------------------ writing

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if not self.writable:
            raise RuntimeError(f"the cache at {self.dir} was opened read-only; open it with writable=True")
        if key in self:
            return
        self._pending[key] = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        if len(self._pending) >= self.items_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write pending entries as one shard, then its index (both atomically)."""

        if not self._pending or self.refused:
            return
        try:
            self._write_shard()
        except OSError as e:
            if not (self.optional and e.errno in UNWRITABLE):  # a full disk stops a run like its other writes
                raise
            self.refused = True
            logger.warning(
                "the data cache %s cannot be written (%s): this run keeps what it encodes in memory, and the next one "
                "encodes it again; make that folder writable, or set data.cache_dir to a writable folder",
                self.shards,
                os.strerror(e.errno).lower(),
            )

    def _write_shard(self) -> None:
        stem = f"{self.run}-r{self.rank:03d}-{self._n_shards:05d}"
        flat = {f"{key}/{name}": t for key, tensors in self._pending.items() for name, t in tensors.items()}
        with atomic_path(self.shards / f"{stem}.safetensors") as tmp:
            save_file(flat, str(tmp), metadata={"format": f"qwen-lora-cache-v{FORMAT_VERSION}"})
        index = {key: sorted(tensors) for key, tensors in self._pending.items()}
        digests = {key: entry_digest(tensors) for key, tensors in self._pending.items()}
        size = (self.shards / f"{stem}.safetensors").stat().st_size
        # The index goes last: an entry becomes visible only once its tensors are safely on disk.
        atomic_write_text(
            self.shards / f"{stem}.json",
            json.dumps({"version": FORMAT_VERSION, "keys": index, "sha256": digests, "bytes": size}),
        )
        for key, names in index.items():
            self._where.setdefault(key, []).insert(0, (f"{stem}.safetensors", tuple(names), digests[key]))
        self.written += len(index)
        self._n_shards += 1
        self._pending = {}

    def close(self) -> None:
        if self.writable:
            self.flush()
        self._open.clear()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Flush on errors too (KeyboardInterrupt included): what was computed is kept for the resume.
        self.close()
