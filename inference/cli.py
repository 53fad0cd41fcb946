"""`qwen-lora generate | edit | layers | batch | serve`: thin wrappers over `Generator`, `run_batch` and the HTTP app.

qwen-lora generate --config configs/demo.yaml --prompt "a bottle" --width 128 --height 128 --output out.png
qwen-lora edit --model Qwen/Qwen-Image-2.1 --lora outputs/brand:0.8 --image in.jpg --prompt "..." --output o.webp
qwen-lora generate --from out.png --seed 8 --output again.png     # the settings out.png carries, another seed
accelerate launch -m qwen_image_lora.cli batch jobs.jsonl --output-dir out/ --config configs/brand.yaml
qwen-lora serve --config configs/brand.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qwen_image_lora.console import counted
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import LAYER_FORMATS
from qwen_image_lora.inference import cli_args as flags
from qwen_image_lora.inference import cli_checks as checks
from qwen_image_lora.io import check_writable
from qwen_image_lora.knobs import (
    BATCH_SEED,
    DEFAULT_BACKGROUND_PROMPT,
    MASK_FEATHER,
    MAX_INPUT_IMAGES,
    SIZE_FIELDS,
)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text-to-image with the base model and optional LoRAs")
    flags.model_args(p)
    flags.sampling_args(p)
    p.add_argument("--prompt", help="required unless --from gives it")
    p.add_argument("--from", dest="from_image", metavar="IMAGE", help=flags.FROM_HELP)
    p.add_argument("--output", required=True, help="PATH.png | .jpg | .webp (the extension picks the format)")
    flags.quality_arg(p)
    flags.overrides_arg(p)
    p.set_defaults(func=_generate, image=[], mask=None, prepare=use_the_trained_model)

    p = subparsers.add_parser("edit", help=f"instruction editing of 1 to {MAX_INPUT_IMAGES} input images")
    flags.model_args(p)
    flags.sampling_args(p)
    p.add_argument("--prompt", help="required unless --from gives it")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help=f"input image (repeat for up to {MAX_INPUT_IMAGES}); required unless --from names them",
    )
    p.add_argument("--from", dest="from_image", metavar="IMAGE", help=flags.FROM_HELP)
    flags.mask_args(
        p, "masked edit of the last --image: white = may change, black = kept exactly (JPEG, WebP: their loss)"
    )
    p.add_argument("--output", required=True, help="PATH.png | .jpg | .webp (the extension picks the format)")
    flags.quality_arg(p)
    flags.overrides_arg(p)
    p.set_defaults(func=_generate, prepare=use_the_trained_model)

    p = subparsers.add_parser(
        "layers", help="layered output: subject cut-out, background, generated elements (PSD, OpenRaster or ZIP)",
        description="Split a product photo into layers a designer can move: `subject` (the input through the mask), "
        "`background` (a masked edit that removes the subject), one layer per --element; plus the flattened PNG.",
    )  # fmt: skip
    flags.model_args(p)
    flags.sampling_args(p, skip=SIZE_FIELDS)
    p.add_argument("--image", required=True, help="the product photo")
    flags.mask_args(
        p,
        "white on the subject; 'auto' takes it from the model's own cut-out (quality depends on the model)",
        required=True,
    )
    p.add_argument("--prompt", help=f"the background instruction (default: {DEFAULT_BACKGROUND_PROMPT})")
    p.add_argument(
        "--element",
        action="append",
        default=[],
        metavar="PROMPT@X,Y,W,H",
        help="a generated element at this box, e.g. 'a red SALE badge@40,40,256,128' (repeatable)",
    )
    p.add_argument("--output", required=True, help="PATH.psd | .ora | .zip (the flattened image goes to PATH.png)")
    flags.overrides_arg(p)
    p.set_defaults(func=_layers, prepare=use_the_trained_model)

    p = subparsers.add_parser(
        "batch", help="run a JSONL of jobs; resumable; shards under accelerate launch",
        description="Render every job of a JSON Lines file into --output-dir (one manifest.jsonl line per image). "
        "A rerun skips finished jobs; under `accelerate launch` each process takes every n-th job.",
        epilog=flags.job_format(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("jobs", help="JSON Lines file, one job per line (format below)")
    p.add_argument("--output-dir", required=True)
    flags.model_args(p)
    p.add_argument("--seed", type=flags.ranged(BATCH_SEED), default=BATCH_SEED.default, metavar="N",
                   help=f"{BATCH_SEED.help} (default {BATCH_SEED.default})")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    flags.overrides_arg(p)
    p.set_defaults(func=_batch, prepare=use_the_trained_model)

    p = subparsers.add_parser(
        "serve",
        help="HTTP service and studio page: POST /v1/images, /v1/layers; GET /, /v1/adapters, /v1/runs, /healthz, /metrics, /openapi.json",
    )
    p.add_argument("--config", help="YAML config; model from `model`, everything else from `serve`")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value, e.g. serve.port=9000")
    p.add_argument("--model", help="overrides model.pretrained")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=_serve, prepare=use_the_trained_model)


def _model_source(args):
    from qwen_image_lora.config import load_config

    given = args.config is not None or any(o.startswith("data.resolution=") for o in args.overrides)
    trained = None if given else _trained(args)
    if trained is not None:  # an adapter is used at the size it trained at (README), config or not
        resolution, where = trained[0]["data"]["resolution"], trained[1]
        print(
            f"note: data.resolution {resolution}, as {where} trained (data.resolution=N picks another)", file=sys.stderr
        )
        args.overrides = [f"data.resolution={resolution}", *args.overrides]
    cfg = load_config(args.config, args.overrides)
    if args.model:
        cfg.model.pretrained = args.model
    if getattr(args, "dtype", None):
        cfg.model.dtype = args.dtype
    return cfg


def _trained(args) -> tuple[dict, Path] | None:
    """The config that trained the first adapter (--lora, or serve's `serve.adapters`) that has one
    (`run_layout.trained_config`)."""
    from qwen_image_lora import run_layout as layout
    from qwen_image_lora.config import load_config
    from qwen_image_lora.knobs import parse_lora_arg

    if args.func is _serve:  # its adapters are config values: a run there was served at 1024 on the default model
        sources = [adapter.path for adapter in load_config(args.config, args.overrides).serve.adapters]
    else:
        sources = [parse_lora_arg(item)[0] for item in getattr(args, "lora", [])]
    return next((t for t in map(layout.trained_config, sources) if t is not None), None)


def use_the_trained_model(args) -> None:
    """Given no config and no model, an adapter of ours runs on the base model it trained on (its run's config.yaml),
    not on the default hub model: that was a download of another model, or an offline error about one never named."""
    named = args.model or getattr(args, "from_image", None) or any(o.startswith("model.pretrained=")
                                                                   for o in args.overrides)  # fmt: skip
    trained = None if args.config is not None or named else _trained(args)
    section = (trained[0].get("model") or {}) if trained else {}
    model = section.get("pretrained")
    if isinstance(model, str) and model:
        args.model = model
        # and its precision and revision: in bfloat16 a run's float32 preview came out 7/255 off (overrides given win)
        given = [f"model.{k}={json.dumps(str(section[k]))}" for k in ("dtype", "revision") if section.get(k)]
        args.overrides = given + args.overrides  # quoted: a revision of digits is a string
        dtype = f" in {section['dtype']}" if section.get("dtype") else ""
        print(f"note: base model {model}{dtype}, as {trained[1]} trained (--model picks another)", file=sys.stderr)


def _check_sources(args) -> None:
    """Each --lora, and the base model unless `--from` names it in its image, before torch, diffusers and peft are
    imported: a mistyped path or an uncached hub id offline fails in about half a second, not eight (both used to
    fail only after the imports, an uncached hub adapter only after the base model had loaded)."""
    from qwen_image_lora.config import load_config
    from qwen_image_lora.hub import check_adapters, check_pretrained
    from qwen_image_lora.knobs import parse_lora_arg

    check_adapters([parse_lora_arg(item)[0] for item in getattr(args, "lora", [])], "--lora")
    if not getattr(args, "from_image", None):
        model = load_config(args.config, args.overrides).model
        check_pretrained(args.model or model.pretrained, model.revision)


def _load(args, cfg, device=None):
    """The base model of `cfg` (`_model_source`) once, then each --lora (`_check_sources` first); returns
    (generator, {adapter name: weight})."""
    from qwen_image_lora.inference.generator import Generator
    from qwen_image_lora.knobs import parse_lora_arg

    generator = Generator.from_config(cfg.model, device, resolution=cfg.data.resolution)
    loras = {}
    for item in args.lora:
        path, weight = parse_lora_arg(item)
        name = generator.adapters.load(path, weight=weight)
        loras[name] = weight
    return generator, loras


def _generate(args) -> int:
    from qwen_image_lora.image_files import format_for, save_image

    format_for(args.output)  # a bad extension fails before the model loads
    check_writable(args.output)  # and so does a folder that cannot be written (was: after the render)
    checks.check_not_an_input("--output", [args.output], args)
    checks.check_output_replaceable("--output", args.output)
    _check_sources(args)
    if not args.from_image:  # before the imports below (about 8 s): a bad flag fails in half a second
        checks.check_request_flags(args)
    checks.check_input_files(args)
    from qwen_image_lora.inference.from_image import apply_from
    from qwen_image_lora.inference.generator import GenerationRequest, check_input_aspects, file_record
    from qwen_image_lora.inference.mask_rules import prepare_mask

    if args.from_image:
        apply_from(args, Path(checks.input_file("--from", args.from_image)), SIZE_FIELDS)
        checks.check_not_an_input("--output", [args.output], args)  # and the inputs the image recorded
        checks.check_request_flags(args)
    images = [checks.input_image("--image", p) for p in args.image]
    mask = checks.input_image("--mask", args.mask, colours=False) if getattr(args, "mask", None) else None
    if mask is not None:
        checks.as_option(
            lambda: prepare_mask(mask, images[-1].size, warn=False)
        )  # the generator's rules, before the model
    request = GenerationRequest.from_settings(args, args.prompt, images=images, mask=mask,
                                              mask_feather=getattr(args, "mask_feather", MASK_FEATHER.default))  # fmt: skip
    checks.check_flags(request, args=args)  # bad sizes, steps or guidance fail before the model loads
    folder = Path(args.output).parent  # the settings name files relative to the image, so --from works from anywhere
    inputs = [file_record(p, folder) for p in args.image]
    mask_input = file_record(args.mask, folder) if mask is not None else None
    cfg = _model_source(args)
    check_input_aspects(images, cfg.data.resolution, "--image")
    generator, request.adapters = _load(args, cfg)
    image = generator.generate(request)
    made_with = generator.describe(request, inputs, mask_input, folder)
    print(f"{save_image(image, args.output, args.quality, made_with)} (seed {request.seed})")
    return 0


def _layers(args) -> int:
    if Path(args.output).suffix.lower() not in LAYER_FORMATS:  # these three before the imports (about 8 s)
        raise InputError(f"--output {args.output}: use .psd, .ora or .zip", "--output")
    _check_sources(args)
    checks.check_input_files(args)
    from qwen_image_lora.inference.generator import GenerationRequest
    from qwen_image_lora.inference.layers import Element, check_outputs_free, check_request, save_layers

    elements = [checks.as_option(Element.parse, e) for e in args.element]  # bad input fails before the model loads
    flat = str(Path(args.output).with_suffix(".png"))  # the flattened image written beside it
    for path in (args.output, flat):
        check_writable(path)
    checks.check_not_an_input("--output", [args.output, flat], args)
    checks.as_option(check_outputs_free, args.output)  # a user's own PSD or <name>.png, before the model loads
    image = checks.input_image("--image", args.image)
    mask = args.mask if args.mask == "auto" else checks.input_image("--mask", args.mask, colours=False)
    checks.as_option(check_request, image, mask, elements)  # element boxes and the mask, before the model loads
    request = GenerationRequest.from_settings(args, "", images=[image], mask_feather=args.mask_feather)
    checks.check_flags(request, args=args)  # bad steps or guidance fail before the model loads
    for note in checks.guidance_notes(args):  # before the model loads, as generate and edit say them
        print(f"note: {note}", file=sys.stderr)
    for name, value in request.quieted().items():  # said: the generator need not say it again
        setattr(request, name, value)
    generator, request.adapters = _load(args, _model_source(args))
    layers = generator.layers(request, mask, args.prompt, elements)
    # The flattened PNG carries no settings block: `--from` would re-create only its background edit.
    for path in save_layers(layers, args.output):
        print(f"{path} (seed {request.seed})")
    return 0


def _jobs_give(n: int) -> str:
    return f"{counted(n, 'job')} {'gives' if n == 1 else 'give'}"


def _batch(args) -> int:
    _check_sources(args)
    from qwen_image_lora.inference.jobs import read_jobs
    from qwen_image_lora.knobs import derived_names, parse_lora_arg

    sources = [parse_lora_arg(item)[0] for item in args.lora]
    names = derived_names(sources)  # the names a line's "loras" picks from
    jobs = read_jobs(
        checks.input_file("jobs file", args.jobs), names
    )  # every line, in a second: before torch and weights
    if unused := sum(job.guidance_unused() for job in jobs):  # once, not a warning per job
        print(f"note: {_jobs_give(unused)} guidance_scale without a negative_prompt; it acts only with one "
              "(Qwen-Image 2.1 samples without guidance)", file=sys.stderr)  # fmt: skip
    if unused := sum(job.negative_unused() for job in jobs):
        print(f"note: {_jobs_give(unused)} a negative_prompt without a guidance_scale above 1; it acts only with one "
              "(the default is 1.0: no guidance)", file=sys.stderr)  # fmt: skip
    for name, why in {name: why for job in jobs for name, why in job.unused.items()}.items():
        print(f"note: {_jobs_give(sum(name in job.unused for job in jobs))} {name}, which {why}", file=sys.stderr)
    if args.seed + len(jobs) - 1 > BATCH_SEED.high:  # job i's seed is SEED + i
        raise InputError(
            f"--seed: {args.seed} + {len(jobs) - 1} (the last job's index) passes the largest seed, {BATCH_SEED.high}",
            "--seed",
        )
    import torch
    from accelerate import PartialState

    from qwen_image_lora.inference.batch import adapter_identity, check_input_sizes, pending, run_batch

    # PartialState only sets up a CPU process group (gloo) when told the run is on CPU.
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    if len(names) > 1 and state.is_main_process:  # a job's "loras" picks adapters by these names
        given = ", ".join(f"{name} = {source}" for name, source in zip(names, sources))
        print(f'adapters: {given} (a job\'s "loras" names them)', file=sys.stderr)
    cfg = _model_source(args)
    check_input_sizes(jobs, cfg.data.resolution, args.jobs)
    run = {"model": cfg.model.pretrained, "revision": cfg.model.revision, "dtype": cfg.model.dtype,
           "resolution": cfg.data.resolution, "loras": [[weight, adapter_identity(path)] for path, weight in map(parse_lora_arg, args.lora)]}  # fmt: skip
    share = dict(process_index=state.process_index, num_processes=state.num_processes, base_seed=args.seed, run=run)
    if not pending(jobs, args.output_dir, **share):
        print(
            f"process {state.process_index}: nothing left to do: all {len(jobs[state.process_index :: state.num_processes])} "
            f"jobs are done in {args.output_dir} (see manifest.jsonl); the model was not loaded",
            file=sys.stderr,
        )
        state.wait_for_everyone()
        return 0
    try:
        generator, loras = _load(args, cfg, device=state.device)
        seconds = generator.warm_up()  # compiled: the jobs' timings and the first outputs do not wait on the compiler
    except KeyboardInterrupt:
        return _batch_stopped(args, state.process_index, 0)
    if seconds:
        print(f"process {state.process_index}: warm-up compiled the transformer in {seconds:.1f} s", file=sys.stderr)
    result = run_batch(
        generator,
        jobs,
        args.output_dir,
        **share,
        default_loras=loras,
        progress=not args.no_progress,
        extra={"model": cfg.model.pretrained, "process_index": state.process_index},
    )
    if result.stopped:  # no wait for the other processes: Ctrl-C reached them too
        return _batch_stopped(args, state.process_index, len(result.written))
    print(
        f"process {state.process_index}: {len(result.written)} written, {len(result.skipped)} already done, "
        f"{len(result.failed)} failed -> {Path(args.output_dir) / 'manifest.jsonl'}",
        file=sys.stderr,
    )
    state.wait_for_everyone()
    return 1 if result.failed else 0


def _batch_stopped(args, process_index: int, written: int) -> int:
    """Ctrl-C: one line instead of a traceback; the exit status a shell gives an interrupted command (128 + SIGINT)."""
    print(f"process {process_index}: stopped (Ctrl-C); {counted(written, 'image')} written this run "
          f"-> {Path(args.output_dir) / 'manifest.jsonl'}; run the same command again to resume", file=sys.stderr)  # fmt: skip
    return 130


def _serve(args) -> int:
    from qwen_image_lora.config import load_config
    from qwen_image_lora.hub import check_adapters
    from qwen_image_lora.serve_config import listen, load_api_keys

    serve = load_config(args.config, args.overrides).serve
    keys = load_api_keys(serve, os.environ)  # no keys, the model or an adapter missing: refused before the imports
    _check_sources(args)
    check_adapters((adapter.path for adapter in serve.adapters), "serve.adapters")  # one file twice: double strength
    serve.host, serve.port = args.host or serve.host, args.port or serve.port
    sock = listen(serve.host, serve.port)  # a port in use, too
    from qwen_image_lora.inference import service

    cfg = _model_source(args)
    cfg.serve.host, cfg.serve.port = serve.host, serve.port
    return service.serve(cfg, keys, sock)
