"""`qwen-lora eval`: base vs adapters on the config's eval prompts and edits, and checkpoints by held-out loss."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _eval(args: argparse.Namespace) -> int:
    from qwen_image_lora.config import load_config
    from qwen_image_lora.hub import check_adapters, check_pretrained

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(args.overrides)
    if args.output is not None:
        overrides.append(f"eval.output_dir={args.output}")
    cfg = load_config(args.config, overrides)
    if args.output is None:
        _report_in_the_evaluated_run(cfg, [*args.adapter, *([args.checkpoints] if args.checkpoints else [])])
    if not args.adapter and not args.checkpoints:
        print("note: no --adapter or --checkpoints given: the report shows the base model alone, with no verdict",
              file=sys.stderr)  # fmt: skip
    check_adapters(args.adapter, "--adapter")  # each in half a second, before torch and diffusers import
    check_pretrained(cfg.model.pretrained, cfg.model.revision)
    from qwen_image_lora.eval.evaluator import evaluate

    html_path, json_path = evaluate(cfg, args.adapter, args.checkpoints)
    report = json.loads(json_path.read_text())
    for verdict in report["verdicts"].values():  # the report's own verdict lines, computed once
        print(verdict["line"])
    if report["checkpoint_verdict"]:
        print(report["checkpoint_verdict"])
    print(f"report: {html_path}\nnumbers: {json_path}")
    return 0


def _report_in_the_evaluated_run(cfg, sources: list[str]) -> None:
    """The report of one other run's adapter or checkpoints goes into that run's folder (`eval/`), where the studio
    shows it beside its run, not into the config's output_dir (another run's, which then showed this report as its
    own). A report setting of its own (eval.output_dir, --output) or several runs keep eval.output_dir."""
    from qwen_image_lora import run_layout as layout

    if Path(cfg.eval.output_dir) != Path(cfg.output_dir) / "eval":  # set apart from the run folder: as given
        return
    runs = {layout.run_holding(source) for source in sources}
    if len(runs) == 1 and None not in runs and (run := runs.pop()) != Path(cfg.output_dir).resolve():
        cfg.eval.output_dir = str(run / "eval")
        print(f"note: the report goes into the evaluated run's folder, {run / 'eval'} (--output to choose)",
              file=sys.stderr)  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="compare the base model with adapters (same prompts and seeds) and rank checkpoints",
        description="Render the config's eval prompts and edits with the base model and each adapter at the same "
        "seeds, score them (palette, text, preservation, alignment, CLIPScore when eval.clip_model is set) and write "
        "report.html + report.json to eval.output_dir. --checkpoints ranks a run's checkpoints by held-out loss.",
    )
    p.add_argument("--config", required=True, help="the YAML config (its eval section drives this command)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH",
        help="an adapter folder or .safetensors file; repeat to compare several",
    )
    p.add_argument(
        "--checkpoints",
        metavar="RUN_DIR",
        help="rank every checkpoint in RUN_DIR/checkpoints and the final adapter by held-out loss "
        "(the held-out settings must match RUN_DIR/config.yaml)",
    )
    p.add_argument("--output", metavar="DIR", help="where to write the report (default: eval.output_dir)")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value, e.g. eval.seeds=[0,1,2]")
    p.set_defaults(func=_eval)
