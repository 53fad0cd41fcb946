"""`qwen-lora data prepare`: encode every clean item once into the on-disk cache (see `data/cache.py`).

    stats = prepare(cfg)     # or under `accelerate launch`: each process takes every world-th item

Steps: the doctor reads everything and excludes bad items (its report goes to `doctor.json` in
`report.verdicts_dir`, where training finds the exclusions; when no file changed since it was written, that
verdict stands and no image is read again); buckets and crops are planned exactly as training plans them
(`dataset.plan_entries`); then, for each item and every text it can train with (each caption after the
template, plus "" under caption dropout), `dataset.TrainingDataset.sample` runs the same `SampleEncoder` that
training runs, on a writable `Cache`. Encoding goes only through `model.encode_latents` / `encode_prompt`.
The entries this data needs are verified first (`Cache.verify`): damaged ones are dropped and re-encoded. Entries
already in the cache are skipped, which is what makes a changed caption cost one embedding, an interrupted run
resume and a run in a new output_dir encode nothing. An item that still fails to encode is recorded in
`prepare-r<rank>.json` beside `doctor.json` (and left out of training) instead of stopping the run; each prepare
replaces the files of the one before, so an item that encodes now trains. In a cache it may not write, a prepare
that has nothing to encode succeeds, saying its verdicts were not recorded.

`data.prepare_batch_size` > 1 first fills the cache in batches (`_encode_together`): items of one layout together,
up to that many same-size images per `encode_latents` call and text-to-image prompts per `encode_prompt` call, each
result split back into the per-sample entries the one-at-a-time path writes (prompts cut to their own tokens). The
per-item pass then finds them cached; when a batch fails, that pass encodes its items alone and names the bad one.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qwen_image_lora.config import Config
from qwen_image_lora.data.buckets import histogram
from qwen_image_lora.data.cache import UNWRITABLE, Cache, model_identity
from qwen_image_lora.data.cache_dir import old_run_cache_note
from qwen_image_lora.data.dataset import SampleEncoder, TrainingDataset, plan_entries
from qwen_image_lora.data.doctor import diagnose, fingerprint
from qwen_image_lora.data.report import Report, read_report, verdicts_dir
from qwen_image_lora.data.sources import load_items
from qwen_image_lora.errors import InputError
from qwen_image_lora.io import atomic_write_text, describe_write_error, writing_to
from qwen_image_lora.model import load_pipeline
from qwen_image_lora.progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class PrepareStats:
    items: int = 0  # items given to this process
    cached: int = 0  # of those, already complete (and intact) in the cache
    damaged: int = 0  # cache entries that failed verification (re-encoded when still used)
    latents_encoded: int = 0
    prompts_encoded: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # item id -> reason
    seconds: float = 0.0


def prepare(
    cfg: Config,
    pipe=None,
    *,
    rank: int = 0,
    world_size: int = 1,
    device=None,
    report: Report | None = None,
    progress: bool = True,
    log=print,
) -> PrepareStats:
    """Fill `cfg.data.cache_dir` for this process's share of the items; returns what it did."""

    start = time.perf_counter()
    d = cfg.data
    if not d.cache_dir:
        raise InputError("data.cache_dir: not set; prepare needs a folder for the cache", "data.cache_dir")
    cache_dir, verdicts = Path(d.cache_dir), verdicts_dir(cfg)
    items = load_items(d)
    past = read_report(verdicts / "doctor.json") if report is None else None
    unchanged = past is not None and _still_holds(past, items)
    if unchanged:
        report = past
    elif report is None:
        report = diagnose(cfg, items, contact_sheet=False)
    if rank == 0:
        if not unchanged:
            _record(lambda: report.write_json(verdicts / "doctor.json"))
        # The doctor's table is `data doctor`'s to print; here one line says what it found and where to look.
        again = " (no file changed since it ran)" if unchanged else ""
        log(f"data doctor{again}: {report.summary()}; details: `qwen-lora data doctor` or {verdicts / 'doctor.json'}")
        if note := old_run_cache_note(cfg.output_dir, cache_dir):
            log(note)
    clean = [it for it in items if it.id not in report.excluded]
    entries, skipped = plan_entries(clean, cfg)
    failed = {item.id: reason for item, reason in skipped}

    if pipe is None:
        pipe = load_pipeline(
            cfg.model.pretrained, cfg.model.dtype, device, revision=cfg.model.revision, transformer=False
        )
    model_id = model_identity(cfg.model)
    stats = PrepareStats()
    with Cache(cache_dir, model_id, writable=True, rank=rank, items_per_shard=d.shard_size) as cache:
        encoder = SampleEncoder(pipe, model_id, cache)
        dataset = TrainingDataset(entries, cfg, encoder)
        mine = range(rank, len(entries), world_size)
        needs = {index: _needed_keys(dataset, index) for index in mine}
        # Damaged entries are forgotten here, so the loop below re-encodes them; one process repairs the indexes.
        damaged = cache.verify(repair=rank == 0, keys=set().union(*needs.values()))
        stats.damaged = sum(len(keys) for keys in damaged.values())
        stats.items = len(mine)
        desc = f"prepare [{rank}]" if world_size > 1 else "prepare"
        with progress_bar(len(mine), desc=desc, unit="item", enabled=progress and rank == 0) as bar:
            todo = []
            for index in mine:
                if all(cache.has(k) for k in needs[index]):
                    stats.cached += 1
                    bar.skip(1)  # cached: no work, not in the rate
                else:
                    todo.append(index)
            for batch in _batches(dataset, todo, d.prepare_batch_size):
                if d.prepare_batch_size > 1:
                    try:
                        _encode_together(dataset, batch, d.prepare_batch_size)
                    except Exception as e:  # noqa: BLE001 - its items are retried one at a time below, naming the bad one
                        logger.warning(
                            "prepare: a batch of %d items failed (%s); encoding them one at a time", len(batch), e
                        )
                # One at a time: encodes what is still missing and names an item that fails, which stays out of training.
                for index in batch:
                    try:
                        for text in dataset.texts_for(index):
                            dataset.sample(index, text)
                    except Exception as e:  # noqa: BLE001 - one bad item must not stop a long preparation
                        failed[entries[index].item.id] = f"{type(e).__name__}: {e}"
                        logger.warning("prepare: %s failed: %s", entries[index].item.id, e)
                bar.update(len(batch))
        stats.latents_encoded = encoder.encoded["latents"]
        stats.prompts_encoded = encoder.encoded["prompts"]
    stats.failed = {k: v for k, v in failed.items()}
    excluded = {k: ["prepare-failed: " + v] for k, v in stats.failed.items()}
    # Each failure holds for its item as it was: an id is a manifest line, and another row can take it later.
    by_id = {item.id: item for item in clean}
    states = {k: fingerprint(by_id[k]) for k in excluded if k in by_id}
    text = json.dumps({"data_path": str(d.path), "excluded": excluded, "fingerprints": states}, indent=1)
    _record(lambda: atomic_write_text(verdicts / f"prepare-r{rank:03d}.json", text))
    if rank == 0:  # this run's outcome replaces an earlier run's: each rank rewrites its own, this one the rest
        _record(lambda: _remove_other_runs(verdicts, world_size))
    stats.seconds = time.perf_counter() - start
    if rank == 0:
        log(
            f"buckets (prepared):\n{histogram([e.target.bucket for e in entries])}" if entries else "nothing to prepare"
        )
    return stats


def _record(write: Callable[[], None]) -> None:
    """Write verdicts; in a cache this process may not write (read-only, no permission), say so and go on: they
    save training the per-item checks, and a complete cache needs no writes to train from."""
    try:
        write()
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        logger.warning("prepare: could not record its verdicts: %s", describe_write_error(e, e.filename or "verdicts"))


def _remove_other_runs(verdicts: Path, world_size: int) -> None:
    """Remove `prepare-r*.json` of ranks this run does not have (an earlier run's, with more processes): their
    items were prepared again here, and a stale failure would keep out an item that now encodes."""
    for path in verdicts.glob("prepare-r*.json"):
        found = re.fullmatch(r"prepare-r(\d+)\.json", path.name)
        if found and int(found.group(1)) >= world_size:
            with writing_to(path):
                path.unlink(missing_ok=True)


def _still_holds(report: Report, items: list) -> bool:
    """Whether the doctor's last verdict on these items stands: the same items, no file changed since (the checks
    across items, duplicates among them, depend on every item), and caption lengths were checked."""
    fresh = {item.id: fingerprint(item) for item in items}
    return report.judged == fresh and "tokenizer-unavailable" not in report.codes()


def _needed_keys(dataset: TrainingDataset, index: int) -> set[str]:
    """The cache keys an item trains with: target and reference latents and the prompt, for each of its texts."""
    keys = set()
    for text in dataset.texts_for(index):
        target, sources, prompt = dataset.keys(index, text)
        keys.update((target, *sources, prompt))
    return keys


def _batches(dataset: TrainingDataset, indices: list[int], size: int) -> list[list[int]]:
    """`indices` grouped by layout (kind and buckets, so their images share sizes), cut into at most `size` items."""
    groups: dict[tuple, list[int]] = {}
    for index in indices:
        groups.setdefault(dataset.entries[index].layout, []).append(index)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _encode_together(dataset: TrainingDataset, indices: list[int], size: int) -> None:
    """Cache what these items miss in batched encoder calls: up to `size` same-size images per VAE call, up to `size`
    text-to-image prompts per text-encoder call. An edit's prompts batch only among themselves: the pipeline's
    `encode_prompt` takes one list of condition images for all its prompts, so two edits cannot share a call."""
    encoder, has = dataset.encoder, dataset.encoder.cache.has
    images: dict[tuple[int, int], dict[str, Callable]] = {}  # bucket -> {latents key: loader}
    t2i: dict[str, str] = {}  # prompt key -> text (the same text of two items is one key)
    edits: list[tuple[dict[str, str], Callable]] = []  # (that item's prompts, its condition images)
    for index in indices:
        entry = dataset.entries[index]
        target, sources = dataset.loaders(index)
        prompts = {}
        for text in dataset.texts_for(index):
            target_key, source_keys, prompt_key = dataset.keys(index, text)
            for key, load, t in zip((target_key, *source_keys), (target, *sources), (entry.target, *entry.sources)):
                if not has(key):
                    images.setdefault(t.bucket, {})[key] = load
            if not has(prompt_key):
                prompts[prompt_key] = text
        if sources:
            edits.append((prompts, lambda sources=sources: [f() for f in sources]))
        else:
            t2i.update(prompts)
    for group in images.values():
        for chunk in _cut(group, size):
            encoder.encode_images(chunk)
    for chunk in _cut(t2i, size):
        encoder.encode_prompts(chunk)
    for prompts, load_images in edits:
        for chunk in _cut(prompts, size):
            encoder.encode_prompts(chunk, load_images)


def _cut(mapping: dict, size: int) -> list[dict]:
    pairs = list(mapping.items())
    return [dict(pairs[i : i + size]) for i in range(0, len(pairs), size)]
