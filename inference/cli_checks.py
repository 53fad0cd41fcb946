"""What an inference command checks of its command line before the model loads (most before its libraries import,
in well under a second): input files, outputs that would replace an input, the sampling flags' rules, flags that
change nothing. A refusal names the option."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from qwen_image_lora.errors import InputError, NotFound
from qwen_image_lora.image_files import ours_to_replace
from qwen_image_lora.knobs import (
    MAX_INPUT_IMAGES,
    SamplingConfig,
    SettingError,
    check_image_count,
    check_masked_size,
    flag,
    unused_settings,
)


def input_image(option: str, path: str, colours: bool = True):
    """An image named on the command line, read by the one image reader (`colours=False`: a mask's numbers are not
    colours, no profile applies); a refusal names the option."""
    from qwen_image_lora.images import MAX_FILE_INPUT_SIDE, ImageInputError, read_with_header

    try:  # `load_image`'s read, with the header it decoded from: the file is opened once
        header, image = read_with_header(input_file(option, path), MAX_FILE_INPUT_SIDE, colours=colours)
    except ImageInputError as e:
        fix = "; downscale it (the model works at about 1024 px)" if e.too_large else ""
        raise InputError(f"{option} {e}{fix}", option) from None
    if max(header.size) > MAX_FILE_INPUT_SIDE:
        print(f"note: {option} {path} is {header.size[0]}x{header.size[1]}; it is read at {MAX_FILE_INPUT_SIDE} px on "
              "its long side, the largest size written", file=sys.stderr)  # fmt: skip
    return image


def _inputs(args) -> list[tuple[str, str]]:
    """(option, path) of each file the command reads: --image, --mask (not `auto`), --from."""
    images = args.image if isinstance(args.image, list) else [args.image]
    named = [("--image", p) for p in images] + [("--mask", getattr(args, "mask", None)),
                                                ("--from", getattr(args, "from_image", None))]  # fmt: skip
    return [(option, path) for option, path in named if path and path != "auto"]


def check_input_files(args) -> None:
    """Every file the command line names exists, checked before the model's libraries import (a mistyped --image
    took 8-13 s to say so)."""
    for option, path in _inputs(args):
        input_file(option, path)


def input_file(option: str, path: str) -> str:
    """A file named on the command line, refused by its option's name before anything opens it."""
    if not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
        raise NotFound(f"{option} {path}: {what}", option)
    return path


def check_not_an_input(option: str, outputs: list[str], args) -> None:
    """Refuse to write over a file this command reads (--image, --mask, --from): it would be replaced before anyone
    noticed, and `--from` an earlier output then fails on the input's changed sha256. `batch` refuses the same."""
    inputs = {Path(path).resolve() for _, path in _inputs(args)}
    for out in outputs:
        if Path(out).resolve() in inputs:
            written = "" if out == outputs[0] else f" (the flattened image of {outputs[0]})"
            raise InputError(f"{option} {out}{written} is one of this command's inputs, which it must not overwrite; "
                             "write to another file name", option)  # fmt: skip


def check_output_replaceable(option: str, path: str) -> None:
    """An existing image at the output without settings of ours is a user's own (or ours retouched since): kept, as
    `batch` and `layers` keep it, before the model loads."""
    if Path(path).is_file() and not ours_to_replace(path):
        raise InputError(f"{option} {path} carries no settings of qwen-lora (a file of your own, or an image retouched "
                         "since), so it is kept; write to another file name, or delete it first", option)  # fmt: skip


def check_request_flags(args) -> None:
    """What the flags alone decide, no image read: the prompt, the number of input images, the sampling rules and a
    masked edit's size."""
    if not args.prompt:
        raise InputError("--prompt: give the prompt (or --from an image that carries one)", "--prompt")
    if args.command == "edit" and not args.image:
        raise InputError(f"--image: give 1 to {MAX_INPUT_IMAGES} input images (or --from an edit whose inputs are "
                         "still there)", "--image")  # fmt: skip
    check_image_count(len(args.image), least=1 if args.command == "edit" else 0, field="--image")
    sampling = SamplingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)})
    check_flags(sampling, args=args)
    if getattr(args, "mask", None):
        check_flags(sampling, check_masked_size, args)
    for note in unused_flags(args):
        print(f"note: {note}", file=sys.stderr)
    for name, value in sampling.quieted().items():  # said above: the generator need not say it again after the load
        setattr(args, name, value)


def unused_flags(args) -> list[str]:
    """Flags given that change nothing in this request: said, not silently recorded in the image's settings."""
    lossless = Path(args.output).suffix.lower() == ".png"
    unused = unused_settings(getattr(args, "given", set()), lossless, bool(getattr(args, "mask", None)))
    return [f"--{name.replace('_', '-')} {why}" for name, why in unused.items()] + guidance_notes(args)


def guidance_notes(args) -> list[str]:
    """Guidance without a negative prompt, or a negative prompt without guidance: each acts on nothing."""
    notes = []
    if SamplingConfig.guidance_unused(args):
        notes.append("--guidance-scale acts only with --negative-prompt (Qwen-Image 2.1 samples without guidance)")
    if SamplingConfig.negative_unused(args):
        notes.append("--negative-prompt acts only with a --guidance-scale above 1 (the default is 1.0: no guidance)")
    return notes


def check_flags(request, rule=None, args=None) -> None:
    """The sampling rules (`SamplingConfig.check`, or `rule`) on what the flags set; a refusal names the flag as it
    was typed (`--steps 0` was refused as `--num-inference-steps`)."""
    typed = getattr(args, "typed", {})

    def spell(field: str) -> str:
        return typed.get(field) or flag(field)

    try:
        rule(request) if rule else request.check()
    except SettingError as e:
        raise InputError(e.spelled(spell), e.field and spell(e.field)) from None


def as_option(check, *inputs):
    """Run a request rule that needs no model. Its error names the field (`mask: ...`, `element 'x': ...`); here
    that is the option that carried it (`--mask: ...`)."""
    from qwen_image_lora.inference.layers import LayersError
    from qwen_image_lora.inference.mask_rules import MaskError

    try:
        return check(*inputs)
    except (MaskError, LayersError) as e:
        raise InputError(f"--{e}") from None
