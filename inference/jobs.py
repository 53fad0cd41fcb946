"""A batch's jobs file: one job per JSON line, each checked before any model loads, every bad line named at once.

The format is printed by `qwen-lora batch --help` (`job_format` in inference/cli_args.py). Reading a jobs file needs
no torch, so a bad line is refused in a second, not after the imports `inference/batch.py` (the rendering) needs.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from qwen_image_lora import typed_yaml
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import format_for
from qwen_image_lora.images import ImageInputError, identify, read_image
from qwen_image_lora.inference.mask_rules import MaskError, prepare_mask
from qwen_image_lora.io import iter_jsonl
from qwen_image_lora.knobs import (
    MASK_FEATHER,
    QUALITY,
    SamplingConfig,
    SettingError,
    check_adapter_weight,
    check_image_count,
    check_masked_size,
    check_range,
    repeated_name,
    unused_settings,
)
from qwen_image_lora.typed_yaml import ConfigError

# A file name holds 255 bytes; an atomic write's temp name adds ~15 to the output name, an id's output 5 more.
MAX_NAME_BYTES = 200
_SAFE_RULE = f"letters, digits, '.', '_' or '-', a letter or digit first, at most {MAX_NAME_BYTES} bytes as UTF-8"


def _safe_name(text: str) -> bool:
    """Letters (with their marks: हिन्दी, grün) and digits of any script, '.', '_' and '-', a letter or digit first (no
    hidden file, no '..'): no separators, no invisible or right-to-left controls. Read as NFC (`_read_job`)."""
    return (
        0 < len(text.encode()) <= MAX_NAME_BYTES
        and unicodedata.category(text[0])[0] in "LN"
        and all(unicodedata.category(c)[0] in "LMN" or c in "._-" for c in text)
    )


def _same_file_key(name: str) -> str:
    """Two names one file takes on macOS or Windows (case-blind) or in a ZIP extracted there."""
    return name.casefold()


@dataclass
class Job(SamplingConfig):
    """One line of the jobs file: the sampling settings (inherited) plus what a job adds, read by the same typed
    loader as configs (paths relative to the file)."""

    prompt: str = ""
    id: str | int | None = None
    images: list[str] = field(default_factory=list, metadata={"path": True})
    # Masked edit of the last image: white = may change, black = kept exactly.
    mask: str | None = field(default=None, metadata={"path": True})
    mask_feather: int = MASK_FEATHER.default
    seed: int | None = None  # default: --seed + the line's index
    # {"name": weight} or the HTTP API's [{"name": ..., "weight": ...}]; a null weight is the --lora one.
    loras: dict[str, float | None] | None = None
    output: str | None = None
    quality: int = QUALITY.default
    index: int = field(default=-1, metadata={"internal": True})  # the line's position, set by `read_jobs`
    # What the line gives that changes nothing (`knobs.unused_settings`), set by `read_jobs`: not a field, so it is
    # neither a key of the line nor part of the job's fingerprint.
    unused: ClassVar[dict[str, str]] = {}

    @property
    def output_name(self) -> str:
        return self.output or f"{self.id}.png"


MAX_LISTED = 10  # bad lines named in one refusal, with why
MAX_LINE_NUMBERS = 200  # of the lines after those: where they are, so one run finds them all


def read_jobs(path: str | Path, adapters: list[str] | None = None) -> list[Job]:
    """Parse and check every line before any model is loaded; errors name the line and the field, every bad line at
    once (one per run, each after seconds of imports, was seven runs for seven bad lines). `adapters`: the names the
    --lora adapters load under, which a line's `loras` may pick (None: not checked)."""
    path = Path(path)
    jobs, outputs, ids, bad = [], {}, {}, []  # output name / id -> line number; ids also keep whether defaulted
    refused: list[InputError] = []  # ours, with the field at fault; `bad` also holds lines that are not JSON
    for where, raw in iter_jsonl(path, InputError, bad):
        try:
            # its position among the lines (a refused line keeps its place: the next must not take its default id)
            jobs.append(_read_job(raw, where, path, len(jobs) + len(bad), outputs, ids, adapters))
        except InputError as e:
            refused.append(e)
            bad.append(str(e))
    if len(bad) == 1:
        raise refused[0] if refused else InputError(bad[0])
    if bad:
        rest = [m.group(1) for b in bad[MAX_LISTED:] if (m := re.match(rf"{re.escape(str(path))}:(\d+):", b))]
        shown = ", ".join(rest[:MAX_LINE_NUMBERS]) + (", ..." if len(rest) > MAX_LINE_NUMBERS else "")
        more = f"; and {len(bad) - MAX_LISTED} more, at lines {shown}" if len(bad) > MAX_LISTED else ""
        raise InputError(f"{len(bad)} lines of {path} are refused: " + "; ".join(bad[:MAX_LISTED]) + more)
    if not jobs:
        raise InputError(f"{path}: no jobs in it (one JSON object per line; `qwen-lora batch --help` shows the format)",
                         "jobs")  # fmt: skip
    return jobs


def _read_job(raw: dict, where: str, path: Path, index: int, outputs: dict, ids: dict, adapters: list[str] | None
              ) -> Job:  # fmt: skip
    """One line as a checked job (the `index`-th line); `outputs` and `ids` gather what the lines so far took."""
    if "index" in raw:
        raise InputError(f"{where}: unknown key 'index' (the line's position is its index)")
    for key in ("id", "output"):  # composed: text pasted from macOS names is decomposed (NFD), one file with NFC
        if isinstance(raw.get(key), str):
            raw[key] = unicodedata.normalize("NFC", raw[key])
    given_id = raw.get("id")
    if isinstance(given_id, (str, int)) and not isinstance(given_id, bool):  # first: a line refused for another
        _claim_id(str(given_id), False, where, ids)  # field still holds its id
    if isinstance(raw.get("loras"), list):  # the HTTP API's form
        raw["loras"] = _loras_mapping(raw["loras"], where)
    try:
        job = typed_yaml.build(Job, raw, "", where, path.parent.resolve(), exact=True)
        job.validate(f"{where}: job")  # the sampling checks: sizes, aspect preset, steps
        check_image_count(len(job.images))
        check_range("quality", job.quality, QUALITY.low, QUALITY.high)  # the limits of every edge (knobs.py)
        check_range("mask_feather", job.mask_feather, MASK_FEATHER.low, MASK_FEATHER.high)
        for name, weight in (job.loras or {}).items():
            if adapters is not None and name not in adapters:
                given = ", ".join(adapters) or "none (give --lora PATH[:WEIGHT])"
                raise InputError(f"{where}: loras: unknown adapter {name!r}; --lora gives: {given}", "loras")
            if weight is not None:
                check_adapter_weight(f"loras.{name}", weight)
        if job.mask is not None:  # refused here, with the other lines, not after the model had loaded
            check_masked_size(job)
    except ConfigError as e:
        raise InputError(str(e)) from None
    except SettingError as e:
        raise InputError(f"{where}: job.{e}") from None
    if not job.prompt:
        raise InputError(f"{where}: prompt is required")
    job.unused = unused_settings(set(raw), job.output_name.lower().endswith(".png"), job.mask is not None)
    job.index = index
    if job.id is None:
        job.id = f"{job.index:06d}"
        _claim_id(job.id, True, where, ids)
    job.id = str(job.id)
    if job.output is not None and (Path(job.output).name != job.output or not _safe_name(job.output)):
        raise InputError(f"{where}: output {job.output!r} must be a plain file name inside the output folder "
                         f"({_SAFE_RULE})", "output")  # fmt: skip
    if job.mask is not None and not job.images:
        raise InputError(f"{where}: mask needs images (it applies to the last one)")
    _check_inputs(job, where)
    try:
        format_for(job.output_name)
    except InputError as e:
        raise InputError(f"{where}: {e}", e.field) from None
    if (key := _same_file_key(job.output_name)) in outputs:
        line, first = outputs[key]
        case = "" if first == job.output_name else f" as {first!r}, one file where case is ignored (macOS, Windows)"
        raise InputError(f"{where}: output {job.output_name!r} is also written by line {line}{case}")
    outputs[key] = where.rsplit(":", 1)[1], job.output_name
    return job


def _claim_id(job_id: str, defaulted: bool, where: str, ids: dict) -> None:
    """Record a line's id; one that is unsafe or another line's is refused."""
    if not _safe_name(job_id):
        raise InputError(f"{where}: id {job_id!r} must be {_SAFE_RULE}", "id")
    if job_id in ids:  # the manifest keys jobs by id: two under one would each redo the other on every rerun
        line, first_defaulted = ids[job_id]
        how = " (a line without an id is named by its position)" if defaulted or first_defaulted else ""
        raise InputError(f"{where}: id {job_id!r} is also line {line}'s id{how}; give each job its own id", "id")
    ids[job_id] = where.rsplit(":", 1)[1], defaulted


def _loras_mapping(items: list, where: str) -> dict:
    """[{"name": n, "weight": w}, ...] (the HTTP API's `loras`) -> {n: w}; an omitted weight is null."""
    if not all(isinstance(i, dict) and isinstance(i.get("name"), str) and set(i) <= {"name", "weight"} for i in items):
        raise InputError(f'{where}: loras: a list holds {{"name": ..., "weight": ...}} objects', "loras")
    if twice := repeated_name(i["name"] for i in items):
        raise InputError(f"{where}: loras: adapter {twice[1]!r} is given twice", "loras")
    return {i["name"]: i.get("weight") for i in items}


# A line naming the wrong kind of file is the line's fault, refused with the others (`edit --image` refuses it at once)
_WRONG_KIND = ("unsupported-format", "animated")


def _check_inputs(job: Job, where: str) -> None:
    """Every input image and mask is a file (paths relative to the jobs file) of a kind the reader takes, and a mask
    passes the generator's rules for its image, before any model loads: a GIF, or a misshapen or all-black mask,
    failed its job at render time, where `edit` refuses them at once. (Sizes: `batch.check_input_sizes`.)"""
    named = [(f"images[{i}]", p) for i, p in enumerate(job.images)] + ([("mask", job.mask)] if job.mask else [])
    for name, p in named:
        if not Path(p).is_file():
            what = "is a folder, not a file" if Path(p).is_dir() else "does not exist"
            raise InputError(f"{where}: {name}: {p} {what} (paths are relative to the jobs file)", name.split("[")[0])
    for i, p in enumerate(job.images):  # a format the reader refuses, as `edit --image` does before the model loads
        try:
            identify(p)
        except ImageInputError as e:
            if e.code in _WRONG_KIND:  # a damaged file fails its own job when it renders; the other jobs still run
                raise InputError(f"{where}: images[{i}]: {e}", "images") from None
    if job.mask is None:
        return
    try:  # the generator's own rules (shape, an all-black mask): such a job failed after the model had loaded
        prepare_mask(read_image(job.mask, colours=False), identify(job.images[-1]).size, warn=False)
    except MaskError as e:
        raise InputError(f"{where}: {e}", "mask") from None
    except ImageInputError as e:
        if e.code in _WRONG_KIND:
            raise InputError(f"{where}: mask: {e}", "mask") from None
