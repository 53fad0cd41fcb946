"""Batch jobs from a JSONL file: catalogue editing at scale, resumable, split across processes.

The jobs file is read and checked by `inference/jobs.py`.
Each image is written atomically, carrying the settings that made it (as `qwen-lora generate` writes them), then one
line goes to `manifest.jsonl` with the settings actually used (size, steps, guidance, seed, adapters) and the job's
fingerprint. A rerun skips every job whose output is a whole image (non-empty, the size its manifest line records, a
readable header) with the same fingerprint, so an interrupted batch picks up where it stopped, and a job whose
settings, input files, model, resolution or adapters changed is rendered again. An image no manifest line records
(a batch stopped between the two writes) counts as done only when it carries this job's settings (`_is_own_render`);
the batch never overwrites a file without settings of ours, nor a job's own input. Under `accelerate launch`,
process i of n takes jobs i, i+n, i+2n, ... of the whole file (the split does not depend on what is already done),
so shards never overlap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from qwen_image_lora.adapter_format import resolve_file
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import format_for, ours_to_replace, read_settings, save_image, settings_as_written
from qwen_image_lora.images import ImageInputError, identify, load_image
from qwen_image_lora.inference.generator import (
    GenerationRequest,
    Generator,
    check_input_aspects,
    file_record,
    one_side_size,
)
from qwen_image_lora.inference.jobs import Job
from qwen_image_lora.io import affects_every_write, check_writable, writing_to
from qwen_image_lora.progress import progress_bar

MANIFEST = "manifest.jsonl"
_ELSEWHERE = 'give this job another "output" name, or use another --output-dir'


def _job_loras(job: Job, default_loras) -> dict[str, float]:
    """The adapters a job renders with: its own (a null weight is the --lora one), else every --lora."""
    defaults = default_loras or {}
    if job.loras is None:
        return dict(defaults)
    return {name: defaults.get(name, 1.0) if weight is None else weight for name, weight in job.loras.items()}


def adapter_identity(source: str) -> str | list:
    """A local adapter as its weights file's absolute path, size and modification time (a retrained adapter renders
    again, a new eval report beside it does not, nor the same file named from another folder); a hub id as given."""
    if not Path(source).expanduser().exists():
        return source
    file = resolve_file(source).resolve()
    return [str(file), file.stat().st_size, file.stat().st_mtime_ns]


def fingerprint(job: Job, base_seed: int, run: dict | None = None) -> str:
    """What decides a job's image: its settings, its seed, its input files' bytes, and `run` (the model, resolution and
    adapters the whole batch uses). A finished job whose fingerprint changed is rendered again."""
    settings = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("id", "index", "output")}
    settings["seed"] = _seed(job, base_seed)
    settings["inputs"] = [
        hashlib.sha256(Path(p).read_bytes()).hexdigest() if Path(p).is_file() else p for p in _inputs(job)
    ]
    return hashlib.sha256(json.dumps([settings, run], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _inputs(job: Job) -> list[str]:
    return [*job.images, *([job.mask] if job.mask else [])]


def _is_done(job: Job, output_dir: Path, recorded: dict[str, dict], fingerprint: str) -> bool:
    """Its last manifest line carries this fingerprint (or none: a manifest of an older version, taken as done) and
    its output is a whole image (`_is_complete`)."""
    entry = recorded.get(job.id)
    return (
        entry is not None
        and entry.get("settings") in (None, fingerprint)
        and _is_complete(output_dir / job.output_name, entry.get("bytes"))
    )


def _is_complete(path: Path, size: int | None = None) -> bool:
    """A non-empty file of the size the manifest recorded (when it did) whose image header reads: an empty, cut
    short or damaged output is rendered again."""
    try:
        actual = path.stat().st_size
        if not path.is_file() or actual == 0 or (size is not None and actual != size):
            return False
        with Image.open(path) as im:  # the header only; the pixels stay on disk
            return im.width > 0 and im.height > 0
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def pending(jobs: list[Job], output_dir: str | Path, *, process_index: int = 0, num_processes: int = 1,
            base_seed: int = 0, run: dict | None = None) -> list[Job]:  # fmt: skip
    """This process's jobs that `run_batch` would still render or record (no model needed to tell)."""
    output_dir = Path(output_dir)
    # A folder at the manifest's name was found only after the model had loaded and an image was made.
    check_writable(output_dir / MANIFEST)
    recorded = _recorded(output_dir / MANIFEST)
    mine = jobs[process_index::num_processes]
    return [j for j in mine if not _is_done(j, output_dir, recorded, fingerprint(j, base_seed, run))]


@dataclass
class BatchResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: bool = False  # interrupted (Ctrl-C) before the last job


def run_batch(
    generator: Generator,
    jobs: list[Job],
    output_dir: str | Path,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    default_loras: dict[str, float] | None = None,
    base_seed: int = 0,
    progress: bool = True,
    extra: dict | None = None,
    run: dict | None = None,
) -> BatchResult:
    """Run this process's share of `jobs`, skipping finished ones. `extra` goes into every manifest line; `run` is
    what the whole batch renders with (see `fingerprint`). Ctrl-C ends the run between writes: the result says
    `stopped`, and what was written counts as done on a rerun."""
    output_dir = Path(output_dir)
    with writing_to(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    mine = jobs[process_index::num_processes]
    recorded = _recorded(output_dir / MANIFEST)
    result = BatchResult()
    bar = progress_bar(
        len(mine),
        desc="batch" if num_processes == 1 else f"batch, process {process_index + 1}/{num_processes}",
        unit="img",
        enabled=progress,
        position=process_index,
    )
    with bar:
        try:
            for job in mine:
                out, settings = output_dir / job.output_name, fingerprint(job, base_seed, run)
                why = None  # why an existing output is rendered again
                try:
                    if out.is_dir():  # was "empty, cut short or damaged", then a raw `[Errno 21] Is a directory`
                        raise InputError(f"{out} is a folder; {_ELSEWHERE}", "output")
                    if out.resolve() in {Path(p).resolve() for p in _inputs(job)}:
                        raise InputError(f"{out} is one of this job's own inputs, which it must not overwrite; "
                                         f"{_ELSEWHERE}", "output")  # fmt: skip
                    if job.id not in recorded and _is_complete(out):  # no manifest line says who wrote it
                        if _is_own_render(generator, job, out, base_seed, default_loras):  # stopped before its line
                            entry = _entry(generator, job, base_seed, default_loras, extra)
                            entry |= {"settings": settings, "bytes": out.stat().st_size, "recovered": True}
                            _append(output_dir / MANIFEST, entry)
                            recorded[job.id] = entry
                        else:
                            why = f"{out.name} holds an image made with other settings"
                    if _is_done(job, output_dir, recorded, settings):
                        result.skipped.append(job.id)
                        bar.skip()  # not in the rate: a rerun's finished jobs made its ETA far too short
                        continue
                    # Its manifest line says this batch wrote it: damaged since, it is rendered again.
                    if out.exists() and not ours_to_replace(out) and (job.id not in recorded or _is_complete(out)):
                        raise _kept(out)
                    if job.id in recorded and recorded[job.id].get("settings") not in (None, settings):
                        why = "its settings changed since it was rendered"
                    elif why is None and out.exists():
                        why = f"{out.name} is empty, cut short or damaged"
                    if why:
                        bar.write(f"job {job.id}: {why}; rendering it again")
                    start = time.perf_counter()
                    request = _request(job, base_seed, default_loras)
                    image = generator.generate(request)
                    save_image(image, out, job.quality, _made_with(generator, request, job, out.parent))
                except (ValueError, OSError) as e:  # a failed or refused job must not stop the run; a rerun retries it
                    if affects_every_write(e):  # a full disk fails every job after it: stop, naming the file
                        raise
                    _append(output_dir / MANIFEST, {"id": job.id, "index": job.index, "error": str(e)})
                    bar.write(f"job {job.id}: {e}")
                    result.failed.append(job.id)
                    bar.skip()  # a refused job wrote nothing: it read as "575 imgs/s"
                    continue
                entry = _entry(generator, job, base_seed, default_loras, extra)
                if not job.images:  # the size the pixel budget gave, not the preset asked for (a line with both is
                    # refused); an edit's follows its input, so a line that recorded one re-rendered at another size
                    entry.update(width=image.width, height=image.height, aspect_ratio=None)
                entry.update(seconds=round(time.perf_counter() - start, 3), settings=settings, bytes=out.stat().st_size)
                _append(output_dir / MANIFEST, entry)
                result.written.append(job.id)
                bar.update()
        except KeyboardInterrupt:  # Ctrl-C: what is written stays written (atomic), and a rerun resumes
            result.stopped = True
    return result


def check_input_sizes(jobs: list[Job], resolution: int, path: str | Path) -> None:
    """Each job's input images, read from their headers, fit the sizing rules `edit --image` checks before the model
    loads (an aspect the model takes at `resolution`; one side given that their aspect can follow): a 3000x40 photo,
    or `width: 128` alone for it, failed its job after the model had loaded. Every such job in one refusal."""
    bad = []
    for job in (j for j in jobs if j.images):
        try:
            headers = [identify(p) for p in job.images]
        except ImageInputError:  # a damaged file fails its own job when it renders, saying why
            continue
        try:
            check_input_aspects(headers, resolution, "images")
            one_side_size(job, headers[-1].size)
        except InputError as e:
            bad.append(f"job {job.id}: {e}")
    if bad:
        raise InputError(f"{path}: " + "; ".join(bad), "images")


def _is_own_render(generator: Generator, job: Job, out: Path, base_seed: int, default_loras) -> bool:
    """Whether `out`, a whole image no manifest line records, is this job's render (the batch stopped between writing
    it and its line). The rule: the settings block it carries must equal the block this job would write into it
    (prompt, size, steps, seed, model, adapters' and inputs' sha256), so it is adopted; a block of ours that differs
    (or is damaged) is another render, replaced (False); a file with no block of ours (a user's own image, an input)
    is never overwritten: InputError, naming it, refuses this job alone."""
    try:
        found = read_settings(out)
    except InputError:  # a damaged block of ours: another render of ours, replaced (as `ours_to_replace` says)
        return False
    if found is None:
        raise _kept(out)
    made = _made_with(generator, _request(job, base_seed, default_loras), job, out.parent)
    return found == json.loads(json.dumps(settings_as_written(made, format_for(out.name), job.quality)))


def _kept(out: Path) -> InputError:
    return InputError(f"{out} carries no settings of qwen-lora batch (a file of your own, or an output retouched "
                      f"since), so it is kept; {_ELSEWHERE}", "output")  # fmt: skip


def _request(job: Job, base_seed: int, default_loras) -> GenerationRequest:
    return GenerationRequest.from_settings(
        job, job.prompt, images=[load_image(p) for p in job.images], seed=_seed(job, base_seed),
        **job.quieted(),  # said once for all (`qwen-lora batch` before the model loads)
        adapters=_job_loras(job, default_loras),
        mask=load_image(job.mask, colours=False) if job.mask else None, mask_feather=job.mask_feather,
    )  # fmt: skip


def _made_with(generator: Generator, request: GenerationRequest, job: Job, folder: Path) -> dict:
    """The settings block the image carries, as `qwen-lora generate` writes it (inputs relative to the image)."""
    inputs = [file_record(p, folder) for p in job.images]
    return generator.describe(request, inputs, file_record(job.mask, folder) if job.mask else None, folder)


def _seed(job: Job, base_seed: int) -> int:
    return job.seed if job.seed is not None else base_seed + job.index


def _entry(generator: Generator, job: Job, base_seed: int, default_loras, extra) -> dict:
    """The settings actually used: defaults resolved, so the line alone reproduces the image."""
    lossy = format_for(job.output_name) != "PNG"  # a JPEG's or WebP's quality is part of what made it
    entry = {
        k: v
        for k, v in dataclasses.asdict(job).items()
        if k not in ("output", "loras", *(() if lossy else ["quality"]))
    }
    entry.update(
        output=job.output_name,
        seed=_seed(job, base_seed),
        num_inference_steps=job.num_inference_steps or generator.default_steps,
        guidance_scale=generator.guidance(job),  # the image's own record: 1.0 without a negative prompt
        negative_prompt=None if job.negative_unused() else job.negative_prompt,  # and none without guidance
        loras=_job_loras(job, default_loras),
        resolution=generator.resolution,
    )
    return entry | (extra or {})


def _append(path: Path, entry: dict) -> None:
    """One write() of one line with O_APPEND: lines from several processes never interleave."""
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
    with writing_to(path):  # os.write's OSError names no file
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _recorded(path: Path) -> dict[str, dict]:
    """Each rendered job's id -> its last manifest line (its `settings` fingerprint, the output's `bytes`)."""
    if not path.is_file():
        return {}
    recorded = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(entry, dict) and "error" not in entry:
            recorded[str(entry.get("id"))] = entry
    return recorded
