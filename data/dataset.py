"""Training batches: items -> bucketed entries -> encoded samples -> homogeneous batches.

    build_training_data(cfg, pipe) -> TrainingData(dataset, sampler, collate, held_out)

The sampler yields lists of `(index, epoch, position)` keys; every batch holds one kind (t2i or edit) and one
bucket layout (target size and reference-image sizes), as the transformer needs one token layout per batch.
Caption choice and dropout depend only on (seed, epoch, index), and the sampler resumes from a cursor
`(epoch, position)` carried by each batch, so a resumed run sees exactly the batches an uninterrupted one would.

Latents and prompt embeddings come from `qwen_image_lora.model` (the pipeline's own encode paths) through a
tensor cache: `get(key) -> dict | None` and `put(key, tensors)`. Keys hash the file's bytes, the crop, the
model id and the caption text, so changing any of them recomputes just that entry.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import Config, DataConfig
from qwen_image_lora.data.buckets import (
    BucketBatchSampler,
    Transform,
    assign_bucket,
    histogram,
    plan_transform,
    short_batches,
    stable_int,
)
from qwen_image_lora.data.cache import (
    Cache,
    CacheDamaged,
    key_for_image,
    key_for_prompt,
    model_identity,
)
from qwen_image_lora.data.cache_dir import old_run_cache_note
from qwen_image_lora.data.screening import reason_code, say_skipped, screen_items
from qwen_image_lora.data.sources import DataError, Item, format_caption, load_items, open_image
from qwen_image_lora.images import converts_colours, has_alpha, identify, read_image

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Entry:
    item: Item
    target: Transform
    sources: tuple[Transform, ...] = ()

    @property
    def layout(self) -> tuple:
        """What must agree inside a batch: kind, target bucket and each reference image's bucket."""
        return (self.item.kind, self.target.bucket, tuple(s.bucket for s in self.sources))


def plan_entries(items: list[Item], cfg: Config) -> tuple[list[Entry], list[tuple[Item, str]]]:
    """Assign buckets and crops. Items whose images cannot be read are skipped and returned with the reason."""
    d = cfg.data
    entries, skipped = [], []
    for item in items:
        try:
            size = identify(item.target, formats=None).size
            bucket = assign_bucket(*size, d.resolution, d.max_upscale)
            seed = stable_int(cfg.train.seed, item.id)
            target = plan_transform(size, bucket, d.crop, seed)
            sources = []
            for src in item.sources:
                src_size = identify(src, formats=None).size
                # Same size as the target: the identical resize and crop, so pixels stay aligned.
                sources.append(
                    target
                    if src_size == size
                    else plan_transform(src_size, assign_bucket(*src_size, d.resolution, d.max_upscale), d.crop, seed)
                )
        except (OSError, ValueError) as e:
            skipped.append((item, f"{type(e).__name__}: {e}"))
            continue
        entries.append(Entry(item, target, tuple(sources)))
    return entries, skipped


# ------------------------------------------------------------------------------------------ encoding


class TensorCache(Protocol):
    def has(self, key: str) -> bool: ...

    def get(self, key: str) -> dict[str, torch.Tensor] | None: ...

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None: ...


class MemoryCache:
    """In-process cache, for runs without a prepared on-disk cache."""

    def __init__(self):
        self._store: dict[str, dict[str, torch.Tensor]] = {}

    def has(self, key):
        return key in self._store

    def get(self, key):
        return self._store.get(key)

    def put(self, key, tensors):
        self._store[key] = tensors


class SampleEncoder:
    """Encodes images and prompts through `qwen_image_lora.model`, reading and filling a tensor cache.

    Keys come from `data/cache.py` (`key_for_image`, `key_for_prompt`), for training and `prepare` alike."""

    def __init__(self, pipe, model_id: str, cache: TensorCache | None = None):
        self.pipe = pipe
        self.model_id = model_id
        self.cache = cache if cache is not None else MemoryCache()
        self.encoded = {"latents": 0, "prompts": 0}  # entries encoded (cache misses)

    def image_key(self, path: Path, transform: Transform, pixels: str) -> str:
        """`pixels`: how pixels are made from the file besides the transform (see `pixel_spec`)."""
        return key_for_image(path, transform, self.model_id, pixels)

    def prompt_key(self, text: str, image_keys: list[str]) -> str:
        return key_for_prompt(text, image_keys, self.model_id)

    def _lookup(self, key: str, encoder: str) -> dict[str, torch.Tensor] | None:
        """The cached entry, or None when it must be encoded. A damaged entry (the cache names its shard) is
        re-encoded when `encoder` is loaded; without it, training stops with the cache's message."""
        try:
            return self.cache.get(key)
        except CacheDamaged:
            if self.pipe is None or getattr(self.pipe, encoder, None) is None:
                raise
            return None

    def latents(self, key: str, load: Callable[[], Image.Image]) -> torch.Tensor:
        """[1, C, 1, h, w] normalised latents."""
        hit = self._lookup(key, "vae")
        return (hit if hit is not None else self.encode_images({key: load})[0])["latents"]

    def prompt(self, key: str, text: str, load_images: Callable[[], list[Image.Image]] | None) -> qmodel.PromptEmbeds:
        hit = self._lookup(key, "text_encoder")
        if hit is None:
            hit = self.encode_prompts({key: text}, load_images)[0]
        return qmodel.PromptEmbeds(hit["embeds"], hit.get("mask"), hit["image_pad"])

    def encode_images(self, loaders: dict[str, Callable[[], Image.Image]]) -> list[dict[str, torch.Tensor]]:
        """Same-size images (key -> loader) in one VAE call; caches and returns each one's {"latents": [1, C, 1, h, w]}."""
        if self.pipe is None or self.pipe.vae is None:
            raise KeyError(
                f"latents {next(iter(loaders))} are not cached and no VAE is loaded; run `qwen-lora data prepare`"
            )
        pixels = torch.cat([qmodel.image_to_pixels(self.pipe, load()) for load in loaders.values()])
        latents = qmodel.encode_latents(self.pipe, pixels).cpu()
        return self._store(loaders, [{"latents": one} for one in latents.split(1)], "latents")

    def encode_prompts(
        self, texts: dict[str, str], load_images: Callable[[], list[Image.Image]] | None = None
    ) -> list[dict]:
        """Prompts (key -> text) sharing one set of condition images (None: text-to-image) in one text-encoder call;
        caches and returns each one's entry, cut to its own tokens: what encoding it alone writes."""
        if self.pipe is None or self.pipe.text_encoder is None:
            raise KeyError(
                f"embeddings {next(iter(texts))} are not cached and no text encoder is loaded; run `qwen-lora data prepare`"
            )
        batch = qmodel.encode_prompt(self.pipe, list(texts.values()), load_images() if load_images else None)
        entries = [
            {"embeds": p.embeds.cpu(), "image_pad": p.image_pad.cpu()} for p in qmodel.split_prompt_embeds(batch)
        ]
        return self._store(texts, entries, "prompts")

    def _store(self, keys, entries: list[dict], kind: str) -> list[dict]:
        for key, hit in zip(keys, entries):
            self.cache.put(key, hit)
        self.encoded[kind] += len(entries)
        return entries


def pixel_spec(d: DataConfig, path: Path) -> str:
    """The part of an image's cache key that is neither the file nor the crop: alpha handling, which changes nothing
    for a file without alpha (its entries then serve every alpha setting), and the conversion of another RGB profile
    to sRGB (a file without one keeps the key it had before readers converted)."""
    parts = []
    if has_alpha(path):
        parts.append("alpha=keep" if d.alpha == "keep" else f"alpha=composite:{d.background.lower()}")
    if converts_colours(path):
        parts.append("colour=srgb")
    return ";".join(parts)


# ------------------------------------------------------------------------------------------ dataset


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, 1, h, w] target latents
    cond_latents: list[torch.Tensor]  # reference-image latents, each [B, C, 1, h_i, w_i]
    prompt: qmodel.PromptEmbeds
    ids: list[str]
    cursor: tuple[int, int]  # (epoch, position) of the next batch, for resuming
    loss_mask: torch.Tensor | None = None  # [B, 1, 1, h, w] per-latent loss weights (masked edits), None = uniform

    @property
    def kind(self) -> str:
        return "edit" if self.cond_latents else "t2i"

    def to(self, device, dtype=None) -> "Batch":
        move = lambda t: t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        weights = None if self.loss_mask is None else self.loss_mask.to(device)
        return Batch(
            move(self.latents),
            [move(c) for c in self.cond_latents],
            self.prompt.to(device, dtype),
            self.ids,
            self.cursor,
            weights,
        )


class TrainingDataset(torch.utils.data.Dataset):
    def __init__(self, entries: list[Entry], cfg: Config, encoder: SampleEncoder):
        self.entries = entries
        self.cfg = cfg
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.entries)

    def caption_for(self, index: int, epoch: int) -> str:
        """Deterministic in (seed, epoch, index): one of the item's captions, or "" under caption dropout."""
        entry, d = self.entries[index], self.cfg.data
        rng = random.Random(stable_int(self.cfg.train.seed, epoch, index))
        caption = rng.choice(entry.item.captions) if entry.item.captions else ""
        if rng.random() < d.caption_dropout:
            return ""
        return format_caption(caption, d) if caption else ""

    def first_caption(self, index: int) -> str:
        captions, d = self.entries[index].item.captions, self.cfg.data
        return format_caption(captions[0], d) if captions else ""

    def texts_for(self, index: int) -> list[str]:
        """Every text `caption_for` can give this item (what `prepare` embeds)."""
        entry, d = self.entries[index], self.cfg.data
        texts = [format_caption(c, d) for c in entry.item.captions]
        if d.caption_dropout > 0 or not texts:
            texts.append("")
        return list(dict.fromkeys(texts))

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, epoch, position = key
        sample = self.sample(index, self.caption_for(index, epoch))
        sample["cursor"] = (epoch, position + 1)
        return sample

    def keys(self, index: int, text: str) -> tuple[str, list[str], str]:
        """(target latents key, reference latents keys, prompt key) of this item with `text`."""
        entry, enc, d = self.entries[index], self.encoder, self.cfg.data
        target_key = enc.image_key(entry.item.target, entry.target, pixel_spec(d, entry.item.target))
        source_keys = [enc.image_key(p, t, pixel_spec(d, p)) for p, t in zip(entry.item.sources, entry.sources)]
        return target_key, source_keys, enc.prompt_key(text, source_keys)

    def loaders(self, index: int) -> tuple[Callable[[], Image.Image], list[Callable[[], Image.Image]]]:
        """Lazy loaders of the target and of each reference image, resized and cropped to their buckets."""
        entry, d = self.entries[index], self.cfg.data

        def load(path: Path, transform: Transform) -> Callable[[], Image.Image]:
            return lambda: transform.apply(open_image(path, d.alpha, d.background))

        return load(entry.item.target, entry.target), [load(p, t) for p, t in zip(entry.item.sources, entry.sources)]

    def sample(self, index: int, text: str) -> dict:
        """Latents of the target and reference images and the embeddings of `text` (with the references)."""
        entry, enc = self.entries[index], self.encoder
        target_key, source_keys, prompt_key = self.keys(index, text)
        target, loaders = self.loaders(index)
        latents = enc.latents(target_key, target)
        return {
            "latents": latents,
            "cond_latents": [enc.latents(k, f) for k, f in zip(source_keys, loaders)],
            "prompt": enc.prompt(prompt_key, text, (lambda: [f() for f in loaders]) if loaders else None),
            "id": entry.item.id,
            "loss_mask": self._loss_weights(entry, latents.shape[-2:]),
        }

    def _loss_weights(self, entry: Entry, grid: tuple[int, int]) -> torch.Tensor | None:
        """[1, 1, 1, h, w]: 1 on kept latents, `train.mask_loss_weight` on changed ones (by the fraction of the
        latent's pixels the edit mask marks), through the target's own resize and crop. None without a mask."""
        weight = self.cfg.train.mask_loss_weight
        if entry.item.mask is None or weight == 1.0:
            return None
        # Read as its target is (EXIF orientation included); the doctor checked its aspect.
        mask = read_image(entry.item.mask, max_pixels=None, formats=None, colours=False)  # coverage: no profile
        mask = entry.target.apply(mask.convert("L"))
        changed = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255).view(1, 1, *mask.size[::-1])
        changed = torch.nn.functional.adaptive_avg_pool2d(changed, tuple(grid))
        return (1 + (weight - 1) * changed).view(1, 1, 1, *grid)


def collate(samples: list[dict]) -> Batch:
    return Batch(
        latents=torch.cat([s["latents"] for s in samples]),
        cond_latents=[torch.cat(group) for group in zip(*(s["cond_latents"] for s in samples))],
        prompt=qmodel.pad_prompt_embeds([s["prompt"] for s in samples]),
        ids=[s["id"] for s in samples],
        cursor=samples[-1]["cursor"],
        loss_mask=_stack_weights(samples),
    )


def _stack_weights(samples: list[dict]) -> torch.Tensor | None:
    weights = [s.get("loss_mask") for s in samples]
    if all(w is None for w in weights):
        return None
    grid = next(w for w in weights if w is not None).shape
    return torch.cat([torch.ones(grid) if w is None else w for w in weights])


@dataclass
class TrainingData:
    dataset: TrainingDataset
    sampler: BucketBatchSampler
    held_out: list[int] = field(default_factory=list)  # dataset indices kept out of training
    skipped: list[tuple[Item, str]] = field(default_factory=list)

    collate = staticmethod(collate)

    def loader(self) -> torch.utils.data.DataLoader:
        workers = self.dataset.cfg.data.num_workers
        if workers and (missing := self.uncached_entries()):
            # A worker process encodes into its own copy of the cache: nothing reached the disk, and workers wrote
            # shards under one name, over each other (the next prepare found them damaged).
            logger.warning("data.num_workers=%d: %d entries are not in the data cache, and what worker processes "
                           "encode is lost, so this run loads in its own process; run `qwen-lora data prepare "
                           "--config ...` first to load with workers", workers, missing)  # fmt: skip
            workers = 0
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers
        )

    def uncached_entries(self) -> int:
        """How many entries (training and held-out, every caption variant) would need the encoders."""
        ds, cache = self.dataset, self.dataset.encoder.cache
        missing = 0
        for index in range(len(ds)):
            for text in ds.texts_for(index):
                target, sources, prompt = ds.keys(index, text)
                missing += not all(cache.has(k) for k in (target, *sources, prompt))
        return missing

    def held_out_batches(self) -> list[Batch]:
        """One batch per held-out item, with its first caption (fixed, for a comparable loss: it went through the
        training draw, a random caption or, under caption dropout, none)."""
        ds = self.dataset
        return [collate([ds.sample(i, ds.first_caption(i)) | {"cursor": (0, 0)}]) for i in self.held_out]


def _tokenizer(pipe):
    """The pipeline's tokenizer, for the caption-length check (None without one: the check is skipped)."""
    return getattr(getattr(pipe, "processor", None), "tokenizer", None)


def build_training_data(
    cfg: Config, pipe, cache: TensorCache | None = None, num_replicas: int = 1, rank: int = 0, training: bool = True
) -> TrainingData:
    """`training=False` (eval's held-out loss): the training batches' buckets, batch size and cache go unsaid."""
    found = load_items(cfg.data)
    items, skipped = screen_items(found, cfg, _tokenizer(pipe))
    entries, unplanned = plan_entries(items, cfg)
    say_skipped(unplanned)
    skipped += unplanned
    if not entries:  # the reasons, counted: "could be read" was said of readable images that had no captions
        reasons = Counter(reason_code(reason) for _, reason in skipped)
        why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        raise DataError(f"data.path: none of the {len(found)} items can train ({why}); run `qwen-lora data doctor`")
    fraction = cfg.validation.held_out_fraction
    draws = [stable_int("held-out", e.item.held_out_key) % 10_000 for e in entries]
    held_out = [i for i, draw in enumerate(draws) if fraction and draw < fraction * 10_000]
    if fraction and not held_out and len(entries) > 1:  # the item that draws lowest: it stays when items are added
        # (unless one draws lower still); the last item was taken, so adding a file moved it, mid-run on a resume
        held_out = [min(range(len(entries)), key=draws.__getitem__)]
    train_ids = [i for i in range(len(entries)) if i not in set(held_out)]
    if not train_ids:
        raise DataError(f"validation.held_out_fraction: {fraction} holds out all {len(entries)} items, leaving none "
                        "to train on; lower it")  # fmt: skip
    if len(held_out) > len(train_ids):
        logger.warning("validation.held_out_fraction=%s holds out %d of %d items: only %d are trained on",
                       fraction, len(held_out), len(entries), len(train_ids))  # fmt: skip
    elif held_out:  # the bucket count dropped with no word of which items went where
        named = ", ".join(entries[i].item.id for i in held_out[:3]) + (", ..." if len(held_out) > 3 else "")
        logger.info("held out %d of %d items for the held-out loss (validation.held_out_fraction=%s): %s",
                    len(held_out), len(entries), fraction, named)  # fmt: skip
    layouts: dict[tuple, list[int]] = {}
    for i in train_ids:
        layouts.setdefault(entries[i].layout, []).append(i)
    largest = max(len(group) for group in layouts.values())
    short, total = short_batches([len(group) for group in layouts.values()], cfg.train.batch_size)
    if training and cfg.train.batch_size > largest:  # a batch is one bucket's items: no larger than the bucket
        logger.warning("train.batch_size=%d, but the largest bucket holds %d items: no batch is larger than that "
                       "(each batch is one bucket's; more data of one size, or a smaller batch_size)",
                       cfg.train.batch_size, largest)  # fmt: skip
    elif training and short * 3 > total:  # 3 of 4 steps at batch 1 (buckets 5, 1, 1 at 4) trained without a word
        logger.warning("train.batch_size=%d: %d of %d batches an epoch hold at most half of it (each batch is one "
                       "bucket's; the buckets below), so their images weigh more in their steps; more data of those "
                       "sizes, or a smaller batch_size", cfg.train.batch_size, short, total)  # fmt: skip
    if training:
        logger.info("buckets (%d items):\n%s", len(train_ids), histogram([entries[i].target.bucket for i in train_ids]))
    if cache is None and cfg.data.cache_dir and (Path(cfg.data.cache_dir) / "shards").is_dir():
        # A prepared cache: read it, and add what is missing (new captions, new items) as this rank's shards.
        if training:
            logger.info("data cache: %s", cfg.data.cache_dir)
        cache = Cache(
            cfg.data.cache_dir,
            model_identity(cfg.model),
            writable=True,
            rank=rank,
            items_per_shard=cfg.data.shard_size,
            optional=True,
        )
    if training and rank == 0 and (note := old_run_cache_note(cfg.output_dir, cfg.data.cache_dir)):
        logger.info(note)
    encoder = SampleEncoder(pipe, model_identity(cfg.model), cache)
    sampler = BucketBatchSampler(list(layouts.values()), cfg.train.batch_size, cfg.train.seed, num_replicas, rank)
    return TrainingData(TrainingDataset(entries, cfg, encoder), sampler, held_out, skipped)
