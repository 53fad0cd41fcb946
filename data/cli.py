"""`qwen-lora data doctor | prepare | caption`.

qwen-lora data doctor <config.yaml or data path> [--strict] [--json OUT] [--html OUT] [key=value ...]
qwen-lora data prepare --config CFG [key=value ...]
accelerate launch --multi_gpu --num_processes N -m qwen_image_lora.cli data prepare --config CFG
    (each process takes every N-th item and writes its own shards; on CPU add ACCELERATE_USE_CPU=1 and keep
    --multi_gpu, which only selects accelerate's multi-process launcher)
qwen-lora data caption --config CFG [--overwrite]
"""

from __future__ import annotations

from pathlib import Path

from qwen_image_lora.cli import config_or_target
from qwen_image_lora.config import load_config
from qwen_image_lora.console import counted
from qwen_image_lora.errors import InputError


def _load(target: str, overrides):
    """A YAML config, or a bare data path (folder or manifest) with the default config."""
    if Path(target).suffix.lower() in (".yaml", ".yml"):
        return load_config(target, overrides)
    return load_config(None, [f"data.path={Path(target).resolve()}", *overrides])


def _doctor(args) -> int:
    from qwen_image_lora.data.doctor import diagnose
    from qwen_image_lora.data.report import verdicts_dir

    for option, path, name in (("--json", args.json, "doctor.json"), ("--html", args.html, "edit_pairs.html")):
        if path is not None and Path(path).is_dir():  # refused before the data is read
            raise InputError(f"{option} {path}: is a folder; give a file path, e.g. {Path(path) / name}", option)
    target = config_or_target(args)
    if target is None:
        raise InputError("data doctor: give a config (.yaml) or a data folder / manifest, e.g. "
                         "`qwen-lora data doctor configs/brand.yaml`", "target")  # fmt: skip
    cfg = _load(target, args.overrides)
    report = diagnose(cfg)
    print(report.table())
    written = []
    # From a config: where prepare and training look for exclusions (per data set, in the shared cache).
    verdicts = verdicts_dir(cfg) if target.endswith((".yaml", ".yml")) else None
    if verdicts:
        report.write_json(verdicts / "doctor.json")
        written.append(str(verdicts / "doctor.json"))
    if args.json:
        report.write_json(args.json)
        written.append(args.json)
    html = args.html
    if html is None and verdicts and report.pairs:
        html = str(verdicts / "edit_pairs.html")
    if html and report.pairs:
        report.write_html(html)
        written.append(html)
    elif args.html:
        print(f"--html {args.html}: not written: the contact sheet shows edit pairs, and this data set has none")
    if written:
        print("wrote " + ", ".join(written))
    return 1 if args.strict and report.errors else 0


def _prepare(args) -> int:
    from qwen_image_lora.data.cache_dir import check_cache_dir
    from qwen_image_lora.hub import check_pretrained

    cfg = load_config(args.config, args.overrides)
    check_pretrained(cfg.model.pretrained, cfg.model.revision)  # in half a second, before torch and diffusers import
    check_cache_dir(cfg.data.cache_dir)
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from qwen_image_lora.data.prepare import prepare

    # PartialState only goes multi-process on CPU when told to (Accelerator reads this flag itself).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    stats = prepare(cfg, rank=state.process_index, world_size=state.num_processes, device=state.device)
    state.wait_for_everyone()
    rate = (stats.latents_encoded + stats.prompts_encoded) / max(stats.seconds, 1e-9)
    who = f" (process {state.process_index + 1} of {state.num_processes})" if state.num_processes > 1 else ""
    print(
        f"prepare{who}: {counted(stats.items, 'item')}, {stats.cached} already cached, "
        f"{stats.latents_encoded} latents + {stats.prompts_encoded} embeddings encoded in {stats.seconds:.1f}s "
        f"({rate:.1f}/s), {len(stats.failed)} failed, {stats.damaged} damaged cache entries dropped -> {cfg.data.cache_dir}"
    )
    return 0


def _caption(args) -> int:
    from qwen_image_lora.data.caption import CAPTION_PROMPT, caption_folder

    cfg = load_config(args.config, args.overrides)
    stats = caption_folder(
        cfg, overwrite=args.overwrite, prompt=args.prompt or CAPTION_PROMPT, max_new_tokens=args.max_new_tokens
    )
    return 1 if stats.failed and not stats.written else 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="check, cache and caption training data")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser(
        "doctor", help="report unreadable, duplicate, uncaptioned, misaligned ... items (never edits them)"
    )
    p.add_argument("target", nargs="?", help="a config (.yaml) or a data folder / manifest")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value")
    p.add_argument("--config", help="the config, as prepare and caption take it (or give it as TARGET)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any item has an error")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--html", default=None, help="contact sheet of edit pairs (default: beside doctor.json)")
    p.set_defaults(func=_doctor)

    p = sub.add_parser("prepare", help="encode latents and prompt embeddings once into data.cache_dir")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("caption", help="write missing .txt captions with the checkpoint's Qwen3-VL")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions")
    p.add_argument("--prompt", default=None, help="the instruction given to the captioner")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=_caption)
