"""Base model vs adapters on the config's eval prompts and edits, and checkpoints ranked by held-out loss.

    evaluate(cfg, adapters, checkpoints_dir) -> (report.html, report.json)

Every image comes from `inference.generator.Generator`, the one sampling path, with the same seeds for every
variant, so base and adapter images are paired and their differences get paired Student-t intervals.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from qwen_image_lora import model as qmodel
from qwen_image_lora import run_layout as layout
from qwen_image_lora.adapter_format import resolve_file
from qwen_image_lora.config import Config, to_dict
from qwen_image_lora.console import counted
from qwen_image_lora.data.dataset import build_training_data
from qwen_image_lora.data.sources import check_edit_files
from qwen_image_lora.errors import AdapterError, InputError, NotFound
from qwen_image_lora.eval import metrics as M
from qwen_image_lora.eval.report import log_to_wandb, write_report
from qwen_image_lora.eval.summary import (
    BASE,
    MIN_PAIRS,
    CheckpointScore,
    Sample,
    best_checkpoint,
    summarise,
    verdicts,
)
from qwen_image_lora.eval_config import EditExample
from qwen_image_lora.images import load_image
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.io import check_writable, content_hash
from qwen_image_lora.knobs import adapter_name_for
from qwen_image_lora.objective import heldout_loss
from qwen_image_lora.progress import progress_bar, track

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class _Job:
    kind: str  # "t2i" or "edit"
    prompt: str
    seed: int
    edit: EditExample | None = None


def evaluate(
    cfg: Config,
    adapters: list[str | Path] = (),
    checkpoints_dir: str | Path | None = None,
    pipe=None,
) -> tuple[Path, Path]:
    """Render, score and report. `pipe` defaults to loading `cfg.model`; a given pipe is left as it was found
    (the adapters loaded here are unloaded again)."""
    notes: list[str] = [f"eval.{text}: rendered without it." for text in cfg.eval.unused_said()]
    jobs = _jobs(cfg, notes)
    names = _adapter_names(adapters)
    # Find every input before loading the model, so a typo fails in seconds rather than after rendering.
    files = {name: resolve_file(path) for name, path in names.items()}
    found = find_checkpoints(checkpoints_dir, notes) if checkpoints_dir else []
    if checkpoints_dir:
        notes += check_run_config(cfg, checkpoints_dir)
    check_writable(Path(cfg.eval.output_dir) / "report.json")  # not after every image is rendered
    if pipe is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = qmodel.load_model(cfg.model, device)
    generator = Generator(pipe, resolution=cfg.data.resolution)
    try:
        for name, file in files.items():
            generator.adapters.load(file, name=name)
        samples = _render(generator, cfg, jobs, list(names))
        checkpoints = score_checkpoints(cfg, generator, found, notes) if found else []
    finally:
        for name in generator.adapters.names:
            generator.adapters.unload(name)
    not_measured = _score(samples, jobs, cfg, notes, device=str(pipe.device))
    if checkpoints:
        line = best_checkpoint(checkpoints)[1]
        notes.append(line[0].upper() + line[1:] + ".")  # not capitalize(): it lowered "final (EMA)"
    paths = write_report(
        cfg.eval.output_dir,
        samples,
        notes=notes,
        checkpoints=checkpoints,
        config=to_dict(cfg),
        not_measured=not_measured,
        adapters={name: {"source": str(names[name]), "sha256": content_hash(file)} for name, file in files.items()},
    )
    if cfg.tracking.backend == "wandb":
        summary = summarise(samples, [BASE, *names])
        log_to_wandb(
            cfg.tracking.project,
            cfg.tracking.run_name,
            cfg.eval.output_dir,
            samples,
            summary,
            verdicts(summary, list(names), not_measured),
        )
    return paths


# ----------------------------------------------------------------------------------------- rendering


def _jobs(cfg: Config, notes: list[str]) -> list[_Job]:
    prompts, edits, section = cfg.eval.prompts, cfg.eval.edits, "eval"
    if not prompts and not edits:
        prompts, edits, section = cfg.validation.prompts, cfg.validation.edits, "validation"
        if prompts or edits:  # said before the renders too: the report alone said it
            notes.append("eval.prompts and eval.edits are empty; used validation.prompts and validation.edits.")
            logger.info(notes[-1])
    if not prompts and not edits:
        raise InputError(
            "eval.prompts / eval.edits: nothing to evaluate; add held-out prompts or edit examples", "eval.prompts"
        )
    check_edit_files(edits, f"{section}.edits")  # before the model loads, not at the first edit's render
    seeds = cfg.eval.render_seeds
    return [_Job("t2i", p, s) for p in prompts for s in seeds] + [
        _Job("edit", e.prompt, s, e) for e in edits for s in seeds
    ]


def _adapter_names(adapters) -> dict[str, Path]:
    """Report names for the adapters: the inference default name, made unique; "base" is taken."""
    names: dict[str, Path] = {}
    for path in map(Path, adapters):
        stem = adapter_name_for(path) or "adapter"
        name, i = stem, 2
        while name in names or name == BASE:
            name, i = f"{stem}-{i}", i + 1
        names[name] = path
    return names


def edit_sources(edit: EditExample) -> list[Image.Image]:
    """An edit's input images, read as `qwen-lora edit` and validation read them (EXIF orientation included)."""
    return [load_image(p) for p in edit.images]


def _render(generator: Generator, cfg: Config, jobs: list[_Job], names: list[str]) -> list[Sample]:
    """All jobs for base, then for each adapter (one adapter switch per variant, not per image)."""
    e = cfg.eval
    quiet = e.quieted()  # a report note, not a warning per image
    samples = [Sample(j.kind, j.prompt, j.seed, images={}) for j in jobs]
    sources = {id(j.edit): edit_sources(j.edit) for j in jobs if j.edit is not None}
    bar = progress_bar(len(jobs) * (1 + len(names)), desc="eval images", unit="img")
    for variant in [BASE, *names]:
        for job, sample in zip(jobs, samples):
            images = sources[id(job.edit)] if job.edit is not None else []
            sizes = dict(width=None, height=None, aspect_ratio=None) if images else {}
            # Edits come back at the input's size, so preservation compares the same pixels.
            request = GenerationRequest.from_settings(e, job.prompt, images=images, seed=job.seed, **sizes, **quiet,
                                                      adapters={} if variant == BASE else {variant: 1.0})  # fmt: skip
            sample.images[variant] = generator.generate(request)
            if images:
                sample.source = images[-1]
                sample.mask = _mask(job.edit, images[-1])
            bar.update(1)
        logger.info("rendered %d images for %s", len(jobs), variant)
    bar.close()
    return samples


# ----------------------------------------------------------------------------------------- scoring


def _score(samples: list[Sample], jobs: list[_Job], cfg: Config, notes: list[str], device: str) -> dict[str, str]:
    """Fill `sample.metrics[variant]`; a metric that does not apply to a sample is simply absent. Returns what
    was not measured and why (for the verdict); `notes` get how to measure it."""
    e = cfg.eval
    not_measured = {}
    scorer, references = _clip(cfg, notes, device)
    if scorer is None:
        not_measured["CLIPScore"] = "eval.clip_model is not set"
    elif not any(s.kind == "t2i" for s in samples):  # CLIP scores a caption; an edit instruction is not one
        not_measured["CLIPScore and reference similarity"] = "scored on eval.prompts only, and there are none"
    elif references is None:
        not_measured["reference similarity"] = "eval.reference_images is not set"
    if not e.palette:
        notes.append("Palette distance skipped: set eval.palette to the brand's hex colours.")
        not_measured["palette"] = "eval.palette is not set"
    if not any(M.quoted_text(s.prompt) for s in samples):
        notes.append('Text accuracy skipped: no prompt quotes text to render (e.g. a poster that says "SALE").')
        not_measured["text accuracy"] = "no quoted text in the prompts"
    if not any(j.edit is not None for j in jobs):
        not_measured["edit preservation"] = "no eval.edits"
    for s, job in zip(samples, jobs):
        mask = _mask(job.edit, s.source) if job.edit is not None else None
        for variant, image in s.images.items():
            m: dict[str, float] = {}
            if e.palette:
                m["palette_delta_e"] = M.palette_distance(image, e.palette)
            text = M.prompt_text_accuracy(image, s.prompt)
            if text is not None:
                m["text_cer"], m["text_word_accuracy"] = text["cer"], text["word_accuracy"]
            if s.kind == "edit":
                m.update(M.preservation(s.source, image, mask))
                a = M.alignment(s.source, image)
                m["shift_px"], m["scale_error"] = math.hypot(a["dx"], a["dy"]), abs(a["scale"] - 1.0)
            elif scorer is not None:
                # CLIPScore needs a caption of the image; an edit instruction is not one.
                m["clip_score"] = scorer.clip_score([image], [s.prompt])[0]
                if references is not None:
                    m["reference_similarity"] = float((scorer.embed_images([image]) @ references.T).mean())
            s.metrics[variant] = m
    return not_measured


def _clip(cfg: Config, notes: list[str], device: str):
    """The CLIP scorer and reference embeddings (N, D), or Nones with a note saying why."""
    e = cfg.eval
    if e.clip_model is None:
        notes.append(
            "CLIPScore and reference similarity skipped: set eval.clip_model to a local CLIP or SigLIP "
            "folder (transformers format); nothing is downloaded."
        )
        return None, None
    scorer = M.ClipScorer(e.clip_model, device=device)
    if e.reference_images is None:
        notes.append("Reference similarity skipped: set eval.reference_images to a folder of on-brand images.")
        return scorer, None
    paths = sorted(p for p in Path(e.reference_images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise NotFound(f"eval.reference_images: no images in {e.reference_images}", "eval.reference_images")
    return scorer, scorer.embed_images([load_image(p) for p in paths])


def _mask(edit: EditExample, source: Image.Image) -> Image.Image | None:
    """The edit's region mask (white = may change) at the source's size, or None."""
    if edit.mask is None:
        return None
    mask = load_image(edit.mask, colours=False).convert("L")
    return mask if mask.size == source.size else mask.resize(source.size, Image.Resampling.NEAREST)


# ----------------------------------------------------------------------------------------- checkpoints


# Settings that decide which items are held out: scoring another split could score items the run trained on.
_SPLIT_KEYS = ("data.path", "data.format", "data.split", "data.columns", "validation.held_out_fraction")
# Settings that change the held-out loss but not the split: the ranking holds, the numbers differ from the run's.
_LOSS_KEYS = ("model.pretrained", "data.resolution", "data.caption_template", "data.trigger_word", "validation.seed")


def find_checkpoints(run_dir: str | Path, notes: list[str] | None = None) -> list[tuple[int, str, Path]]:
    """(step, name, adapter folder) of every complete checkpoint of a run, oldest first, then the run's final
    adapter (named "final", or "final (EMA)" beside a last checkpoint of other weights) when training has written it.
    A checkpoint folder without its adapter is left out with a line in `notes`, as a damaged adapter is when scored."""
    run_dir, notes = Path(run_dir), [] if notes is None else notes
    if not run_dir.is_dir():
        raise NotFound(f"--checkpoints: {run_dir} is not a folder", "--checkpoints")
    found = []
    for folder in layout.checkpoints(run_dir):
        if not (folder / layout.ADAPTER).is_dir():  # it stopped the whole eval, every other checkpoint unscored
            logger.warning("%s is not scored: it has no %s/ folder", folder.name, layout.ADAPTER)
            notes.append(f"{folder.name} is not scored: it has no {layout.ADAPTER}/ folder")
            continue
        found.append((layout.checkpoint_step(folder), folder.name, folder / layout.ADAPTER))
    metadata = run_dir / layout.METADATA
    if (run_dir / layout.FINAL_ADAPTER).is_file() and metadata.is_file():
        final = (int(json.loads(metadata.read_text())["steps"]), "final", run_dir)
        # The last step is checkpointed too. With the final adapter's weights it is scored once, as "final"; with
        # other weights the final adapter holds the EMA of that step (the adapter the run ships), and says so.
        if found and found[-1][0] == final[0]:
            same = _same_weights(resolve_file(found[-1][2]), run_dir / layout.FINAL_ADAPTER)
            if same:
                found.pop()
            elif same is False:
                final = (final[0], "final (EMA)", run_dir)
        found.append(final)
    if not found:
        raise NotFound(
            f"--checkpoints: no step-<N> checkpoint folders in {run_dir / layout.CHECKPOINTS} "
            f"and no final adapter ({layout.FINAL_ADAPTER} + {layout.METADATA}) in {run_dir}"
        )
    return found


def check_run_config(cfg: Config, run_dir: str | Path) -> list[str]:
    """Compare the held-out settings with the run's saved config: a different split is an error (ValueError),
    other differences come back as report notes."""
    saved_path = Path(run_dir) / layout.CONFIG
    if not saved_path.is_file():
        return [f"{saved_path} not found: could not check that the checkpoints are scored on the run's held-out split."]
    saved, current = yaml.safe_load(saved_path.read_text()) or {}, to_dict(cfg)
    if not _get(saved, "validation.held_out_fraction"):  # "set it to the run's fraction" then hit the split check
        raise InputError(
            f"--checkpoints {run_dir}: the run held out no items (validation.held_out_fraction: 0 in {saved_path}), "
            "so its checkpoints have no held-out loss to rank them by; drop --checkpoints (--adapter still compares "
            "an adapter with the base model), or train with validation.held_out_fraction > 0",
            "--checkpoints",
        )
    differ = {
        k: (_get(saved, k), _get(current, k)) for k in (*_SPLIT_KEYS, *_LOSS_KEYS) if _get(saved, k) != _get(current, k)
    }
    split = [f"{k} is {here!r} here but {run!r} in the run" for k, (run, here) in differ.items() if k in _SPLIT_KEYS]
    if split:
        raise InputError(
            f"--checkpoints {run_dir}: the held-out split differs from the run's ({'; '.join(split)}), so "
            f"held-out items could be training items. Pass --config {saved_path}, or set those keys to "
            "the run's values"
        )
    return [
        f"Held-out losses differ from the run's logged heldout_loss: {k} is {here!r} here but {run!r} in the run."
        for k, (run, here) in differ.items()
    ]


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _same_weights(a: Path, b: Path) -> bool | None:
    """None when either cannot be read: a damaged file is scored on its own, and left out with a note."""
    try:
        first, second = load_file(a), load_file(b)
    except (SafetensorError, OSError):
        return None
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def score_checkpoints(
    cfg: Config, generator: Generator, checkpoints: list[tuple[int, str, Path]], notes: list[str]
) -> list[CheckpointScore]:
    """Held-out loss of the base model (named BASE, step 0) and of each (step, name, adapter folder) from
    `find_checkpoints`.

    The items are those `validation.held_out_fraction` keeps out of training and the noise and times are
    fixed by `validation.seed`: with the run's own config this is the split and the number the run logged as
    `heldout_loss`, so the table lines up with the training curves. A checkpoint that cannot be loaded (damaged,
    NaN) is left out with a line in `notes`.
    """
    batches = build_training_data(cfg, generator.pipe, training=False).held_out_batches()
    if not batches:
        raise InputError(
            "validation.held_out_fraction: no held-out items to score checkpoints on; set it to the "
            "fraction the run held out (> 0)"
        )
    if len(batches) < MIN_PAIRS:  # image metrics wait for 6 pairs; a ranking on 4 items named a "best" unqualified
        notes.append(f"Checkpoints are ranked on {counted(len(batches), 'held-out item')} (one loss each, no interval): "
                     "close losses may swap on other items.")  # fmt: skip
    generator.adapters.set({})  # the reference: a checkpoint worse than the base model is no "best"
    scores = [CheckpointScore(BASE, 0, heldout_loss(generator.pipe.transformer, batches, cfg.validation.seed))]
    logger.info("base model: held-out loss %.5g", scores[0].loss)
    for step, name, adapter in track(checkpoints, desc="checkpoints", unit="adapter"):
        try:
            loaded = generator.adapters.load(adapter, name=f"eval-{name}")
        except AdapterError as e:  # one damaged checkpoint threw away every image rendered and the other scores
            logger.warning("%s is not scored: %s", name, e)
            notes.append(f"{name} is not scored: {e}")
            continue
        try:
            generator.adapters.set({loaded: 1.0})
            loss = heldout_loss(generator.pipe.transformer, batches, cfg.validation.seed)
        finally:
            generator.adapters.unload(loaded)
        if not math.isfinite(loss):
            notes.append(f"{name}: its held-out loss is {loss} (the model's output overflowed with it); not ranked.")
        logger.info("%s: held-out loss %.5g", name, loss)
        scores.append(CheckpointScore(name, step, loss))
    return scores
