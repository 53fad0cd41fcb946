"""`--from IMAGE` for generate and edit: the settings an image carries fill in what the command line left out, and
each recorded input or adapter is used only while its file still has the recorded sha256."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from qwen_image_lora.adapter_format import resolve_file
from qwen_image_lora.errors import InputError, NotFound, UserError
from qwen_image_lora.hub import is_hub_id
from qwen_image_lora.inference.generator import ImageSettings
from qwen_image_lora.io import content_hash
from qwen_image_lora.knobs import QUALITY, SamplingConfig, check_range, parse_lora_arg


def _recorded_model(image: Path, pretrained: str) -> str:
    """The model an image names. An API image names a local folder by its name alone (the server's path is not
    given to clients): it was looked up on the hub (`hf download tiny`), or taken from a folder of that name here
    without a word."""
    if "/" in pretrained or "\\" in pretrained:  # a path, or a hub id (owner/name)
        return pretrained
    if not Path(pretrained).is_dir():
        raise InputError(f"--from {image}: it names its model by a folder name alone, {pretrained!r} (an image made by "
                         "`qwen-lora serve`, which keeps the server's path to itself); give --model PATH", "--model")  # fmt: skip
    print(f"note: --from {image}: it names its model by a folder name alone; using ./{pretrained} (give --model "
          "PATH for another)", file=sys.stderr)  # fmt: skip
    return pretrained


def apply_from(args, image: Path, no_size: tuple[str, ...]) -> None:
    """`--from IMAGE`: what the command line left out comes from the settings IMAGE carries. An adapter or input is
    taken from its recorded file only while that file has the recorded sha256. A size option given (one of
    `no_size`) or a `data.resolution=` override replaces the recorded size whole."""
    try:
        made = ImageSettings.read(image)
    except InputError as e:
        raise InputError(f"--from {e}", "--from") from None
    if made is None:
        raise InputError(f"--from {image}: it carries no qwen-image-lora settings (--from takes an image written by "
                         "generate, edit, batch or the API)", "--from")  # fmt: skip
    if made.images and args.command != "edit":
        raise InputError(f"--from {image}: it is an edit of {len(made.images)} image(s); re-create it with "
                         f"`qwen-lora edit --from {image}`", "--from")  # fmt: skip
    given = getattr(args, "given", set())
    overridden = {o.split("=", 1)[0].strip() for o in args.overrides}
    # A size given here replaces the recorded one whole; so does a resolution, which the recorded size would outrank.
    size_given = bool(given & set(no_size)) or "data.resolution" in overridden
    for f in dataclasses.fields(SamplingConfig):
        if f.name not in given and not (size_given and f.name in no_size):
            setattr(args, f.name, getattr(made, f.name))
    args.prompt = args.prompt if args.prompt is not None else made.prompt
    if made.model is not None:
        if "model.pretrained" not in overridden and not args.model:
            args.model = _recorded_model(image, made.model.pretrained)
        if "model.dtype" not in overridden:
            args.dtype = args.dtype or made.model.dtype
        if made.model.revision is not None:
            args.overrides = [f"model.revision={made.model.revision}", *args.overrides]  # a later override wins
    args.overrides = [f"data.resolution={made.resolution}", *args.overrides]
    args.lora = _given_adapters(image, args.lora, made.loras) if args.lora else _recorded_adapters(image, made.loras)
    if args.command == "edit":
        if not args.image:
            if not made.images:
                raise InputError(f"--from {image}: it was made from text alone; give --image for the images to edit",
                                 "--image")  # fmt: skip
            args.image = [recorded_file(image, r, "--image", f"input image {i}") for i, r in enumerate(made.images, 1)]
        if args.mask is None and made.mask is not None:
            args.mask = recorded_file(image, made.mask, "--mask", "the mask")
        if "mask_feather" not in given and made.mask_feather is not None:
            args.mask_feather = made.mask_feather
    if made.quality is not None and "quality" not in given:
        try:
            check_range("quality", made.quality, QUALITY.low, QUALITY.high)
        except InputError as e:
            raise InputError(f"--from {image}: its {e}; give --quality", "--quality") from None
        args.quality = made.quality


def recorded_file(image: Path, record, option: str, what: str) -> str:
    """An input an image's settings name (relative to the image), if it is still there with the recorded sha256."""
    head = f"--from {image}: {what}"
    if record.path is None:
        raise InputError(f"{head} was sent as bytes (recorded by sha256 alone); give {option}", option)
    path = image.parent / record.path
    if not path.is_file():
        raise NotFound(f"{head}, {path}, is not there any more; give {option}", option)
    if content_hash(path) != record.sha256:
        raise InputError(f"{head}, {path}, has changed since the image was made (sha256 differs); give {option} to use "
                         "it as it is", option)  # fmt: skip
    return str(path)


def _recorded_adapters(image: Path, records) -> list[str]:
    """Each adapter the image was made with, as `PATH:WEIGHT`; or one error naming every one that cannot be used,
    with a `--lora` for each (a fix that named the first alone, once followed, replaced the whole list: the others
    were dropped without a word)."""
    found: dict[str, str] = {}
    problems = []
    for record in records:
        try:
            found[record.name] = recorded_adapter(image, record)
        except _Unusable as e:
            problems.append(f"adapter {record.name!r}: {e}")
            found[record.name] = e.source  # the changed file or the hub id to give as it is, else PATH
    if problems:
        fix = " ".join(f"--lora {found[r.name]}:{r.weight!r}" for r in records)
        raise InputError(f"--from {image}: {'; '.join(problems)}; give {fix}", "--lora")
    return [f"{found[r.name]}:{r.weight!r}" for r in records]


def _given_adapters(image: Path, items: list[str], records) -> list[str]:
    """`--lora` given with `--from` replaces the recorded adapters. One given without a weight takes the weight the
    image recorded for the same weights (by sha256; it had rendered at 1.0), or for the same file changed since
    (said); a recorded adapter left out is said."""
    given, covered = [], set()
    for item in items:
        path, _ = parse_lora_arg(item)
        try:
            file = resolve_file(path)
        except UserError:  # not there, or a hub adapter not cached: loading it names the problem
            given.append(item)
            continue
        digest = content_hash(file)
        record = next((r for r in records if r.sha256 == digest), None)
        if record is None and (
            record := next((r for r in records if _recorded_file(image, r) == file.resolve()), None)
        ):
            print(f"note: --from {image}: adapter {record.name!r} has changed since the image was made (sha256 "
                  f"differs); {path} is used as it is", file=sys.stderr)  # fmt: skip
        if record is not None:
            covered.add(record.name)
            given.append(f"{path}:{record.weight!r}" if path == item else item)
        else:
            given.append(item)
    left_out = [f"{r.name!r} at {r.weight!r}" for r in records if r.name not in covered]
    if left_out:
        print(f"note: --from {image}: the --lora given replace the adapters it was made with; left out: "
              f"{', '.join(left_out)}", file=sys.stderr)  # fmt: skip
    return given


def _recorded_file(image: Path, record) -> Path | None:
    """The weights file a record's local path names now, resolved; None for a server's, a hub id's or a missing one."""
    local = image.parent / record.path if record.path is not None else None
    if local is None or not local.exists():
        return None
    try:
        return resolve_file(local).resolve()
    except UserError:
        return None


class _Unusable(Exception):
    """Why a recorded adapter cannot be used as recorded; `source`: what to give as `--lora` to use it anyway (the
    changed file, the hub id), else PATH."""

    def __init__(self, reason: str, source: str = "PATH"):
        super().__init__(reason)
        self.source = source


def recorded_adapter(image: Path, record) -> str:
    """A recorded adapter (a path relative to the image, or a hub id), if its weights file still has the recorded
    sha256; else _Unusable says why."""
    if record.path is None:
        raise _Unusable("it is a server's (recorded by sha256 alone)")
    local = image.parent / record.path
    hub = is_hub_id(record.path) and not local.exists()
    if not hub and not local.exists():
        raise _Unusable(f"{local} is not there any more")
    try:
        file = resolve_file(record.path if hub else local)
    except UserError as e:  # a hub adapter that is not cached, offline
        raise _Unusable(str(e), record.path) from None
    if content_hash(file) != record.sha256:
        raise _Unusable(f"{file} has changed since the image was made (sha256 differs)", str(local))
    return record.path if hub else str(local)
