"""The evaluation report: one self-contained HTML page (images and plots inlined) plus a JSON file with every
number, both written atomically so a reader never sees half a report.

The input is a list of `Sample`s: one prompt (or edit) at one seed, rendered by the base model and by each
adapter with the same seed, with per-variant metric values; `summary.py` turns them into intervals and verdicts,
which every output (HTML, JSON, the CLI summary, W&B) opens with.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import time
from pathlib import Path

from PIL import Image, ImageChops, ImageFilter

from qwen_image_lora.console import WANDB_SETTINGS, counted
from qwen_image_lora.eval.metrics import to_rgb_array
from qwen_image_lora.eval.summary import (
    BASE,
    BETTER,
    FAMILY_ERROR,
    METRICS,
    MIN_PAIRS,
    WORSE,
    CheckpointScore,
    Sample,
    best_checkpoint,
    compare,
    fmt,
    summarise,
    verdicts,
)
from qwen_image_lora.io import atomic_write_text

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- writing


def _finite_or_none(value):
    """Strict JSON has no NaN/Infinity; an unscored value becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def write_report(
    out_dir: str | Path,
    samples: list[Sample],
    *,
    title: str = "Qwen-Image LoRA evaluation",
    notes: list[str] = (),
    checkpoints: list[CheckpointScore] = (),
    config: dict | None = None,
    not_measured: dict[str, str] | None = None,
    adapters: dict[str, dict] | None = None,
) -> tuple[Path, Path]:
    """Write `report.html` and `report.json` into `out_dir`; returns their paths. Both open with the verdicts.

    notes: lines shown at the top (e.g. which metrics were skipped and how to enable them). checkpoints: held-out
    losses of a run's checkpoints (and the base model's, as BASE at step 0); the lowest is marked best when it beats
    the base model. config: the resolved config, stored in the JSON.
    not_measured: metrics not scored -> why, for the verdict line. adapters: each variant's `source` (as given) and
    the `sha256` of its weights, so a saved report says which file beat the base.
    """
    out_dir = Path(out_dir)
    variants = _variants(samples)
    summary = summarise(samples, variants)
    verdict = verdicts(summary, [v for v in variants if v != BASE], not_measured)
    best, checkpoint_line = best_checkpoint(checkpoints) if checkpoints else (None, None)
    data = {
        "title": title,
        "verdicts": verdict,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "variants": variants,
        "adapters": adapters or {},
        "notes": list(notes),
        "metrics": {
            name: {"label": METRICS[name].label, "higher_is_better": METRICS[name].higher_is_better, **entry}
            for name, entry in summary.items()
        },
        "samples": [{"kind": s.kind, "prompt": s.prompt, "seed": s.seed, "metrics": s.metrics} for s in samples],
        "checkpoints": [vars(c) for c in checkpoints],
        "best_checkpoint": best,
        "checkpoint_verdict": checkpoint_line,
        "config": config,
    }
    # Both made before the previous pair is moved aside: a failure between the two writes left a new JSON beside no page.
    json_text = json.dumps(_finite_or_none(data), indent=2, allow_nan=False)
    html_text = _render_html(title, variants, samples, summary, verdict, list(notes), list(checkpoints), best,
                             adapters or {})  # fmt: skip
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    keep_previous(json_path, html_path)
    atomic_write_text(json_path, json_text)
    atomic_write_text(html_path, html_text)
    return html_path, json_path


def keep_previous(*paths: Path) -> None:
    """A report already in the folder stays, renamed by when it was written (`report-20261206-194512.json`): eval
    replaced it silently, and another adapter's or checkpoint's report was gone."""
    found = [p for p in paths if p.is_file()]
    if not found:
        return
    written = time.strftime("%Y%m%d-%H%M%S", time.localtime(found[0].stat().st_mtime))
    stamp, n = written, 1
    while any(p.with_name(f"{p.stem}-{stamp}{p.suffix}").exists() for p in paths):  # two reports in one second
        n += 1
        stamp = f"{written}-{n}"
    for path in found:
        os.replace(path, path.with_name(f"{path.stem}-{stamp}{path.suffix}"))
    log.info("kept the previous report as %s", ", ".join(f"{p.stem}-{stamp}{p.suffix}" for p in found))


def _variants(samples: list[Sample]) -> list[str]:
    names = []
    for s in samples:
        names += [v for v in s.images if v not in names]
    return sorted(names, key=lambda v: v != BASE)  # base first, adapters in the order given


# ----------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.better{color:#0a7d2c}.worse{color:#b3261e}.best{font-weight:bold}
.verdict{font-size:15px;background:#eef6ff;border:1px solid #9cc3e8;padding:8px 12px;margin-bottom:8px}
.notes{background:#fff8e1;border:1px solid #f0d98c;padding:8px 12px;font-size:13px}
.grid td,.grid th{vertical-align:top;text-align:center}.grid img{max-width:256px;max-height:256px;display:block;margin:auto}
.grid .prompt{text-align:left;max-width:260px;font-size:12px}.cap{font-size:11px;color:#555;text-align:left}
"""


def _delta_level(summary: dict) -> str:
    """How sure the Δ intervals are, together: each at 1 - 0.05/m over the m metrics measured."""
    level = next((d["confidence"] for e in summary.values() for d in e["delta"].values()), 1 - FAMILY_ERROR)
    return f"95% together over {counted(len(summary), 'metric')} (each {100 * level:.3g}%)"


def _ci_text(entry: dict) -> str:
    spread = f"all {entry['n']} equal" if entry["all_equal"] else f"[{fmt(entry['low'])}, {fmt(entry['high'])}]"
    return f"{fmt(entry['mean'])} <small>{spread}</small>"


def _render_html(title, variants, samples, summary, verdict, notes, checkpoints, best, adapters) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    if verdict:
        parts.append("<div class='verdict'>" + "<br>".join(html.escape(v["line"]) for v in verdict.values()) + "</div>")
    parts.append(
        f"<p>{counted(len(samples), 'sample')}; variants: {', '.join(html.escape(v) for v in variants)}. "
        f"Means with Student-t 95% intervals; Δ is the paired difference to base, its intervals {_delta_level(summary)} "
        f"(a verdict needs {MIN_PAIRS} pairs).</p>"
    )
    if adapters:
        parts.append("<p>" + "<br>".join(f"{html.escape(name)}: {html.escape(a['source'])} (sha256 "
                                         f"{a['sha256'][:12]})" for name, a in adapters.items()) + "</p>")  # fmt: skip
    if notes:
        parts.append("<div class='notes'>" + "<br>".join(html.escape(n) for n in notes) + "</div>")
    if summary:
        parts.append("<h2>Metrics</h2>" + _metric_table(variants, summary))
        parts.append(f"<p><img alt='metric plot' src='{_png_uri(_metric_plot(variants, summary))}'></p>")
    if checkpoints:
        parts.append("<h2>Checkpoints (held-out flow-matching loss)</h2>" + _checkpoint_table(checkpoints, best))
        parts.append(f"<p><img alt='checkpoint plot' src='{_png_uri(_checkpoint_plot(checkpoints, best))}'></p>")
    if samples:
        parts.append("<h2>Samples</h2>" + _grid(variants, samples))
    parts.append("</body></html>")
    return "\n".join(parts)


def _metric_table(variants, summary) -> str:
    head = "<tr><th class='l'>metric</th>" + "".join(f"<th>{html.escape(v)}</th>" for v in variants)
    head += "".join(f"<th>Δ {html.escape(v)}</th>" for v in variants if v != BASE) + "</tr>"
    rows = []
    for name, entry in summary.items():
        info = METRICS[name]
        arrow = "↑" if info.higher_is_better else "↓"
        unit = f" ({info.unit})" if info.unit else ""
        cells = "".join(f"<td>{_ci_text(entry['variants'][v])}</td>" for v in variants)
        for v, d in entry["delta"].items():
            # Colour only a difference whose interval excludes zero (the verdict's rule).
            cls = {BETTER: "better", WORSE: "worse"}.get(compare(name, d), "")
            cells += f"<td class='{cls}'>{'+' if d['mean'] > 0 else ''}{_ci_text(d)}</td>"
        rows.append(f"<tr><td class='l'>{html.escape(info.label)}{unit} {arrow}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _checkpoint_table(checkpoints, best) -> str:
    def label(c) -> str:
        return "base model (no adapter)" if c.name == BASE else c.name + (" (best)" if c.name == best else "")

    rows = "".join(
        f"<tr class='{'best' if c.name == best else ''}'><td class='l'>{html.escape(label(c))}"
        f"</td><td>{c.step}</td><td>{c.loss:.5g}</td></tr>"
        for c in checkpoints
    )
    return f"<table><tr><th class='l'>checkpoint</th><th>step</th><th>loss</th></tr>{rows}</table>"


def _grid(variants, samples) -> str:
    has_source = any(s.source is not None for s in samples)
    head = "<tr><th class='l'>prompt</th>" + ("<th>source</th>" if has_source else "")
    head += "".join(f"<th>{html.escape(v)}</th>" for v in variants) + "</tr>"
    rows = []
    for s in samples:
        cells = f"<td class='prompt'><b>{s.kind}</b>, seed {s.seed}<br>{html.escape(s.prompt)}</td>"
        if has_source:
            cells += f"<td>{_img_tag(_outlined(s.source, s.mask))}</td>" if s.source is not None else "<td></td>"
        for v in variants:
            values = s.metrics.get(v, {})
            cap = "<br>".join(
                f"{html.escape(METRICS[k].label)}: {fmt(values[k])}"
                for k in METRICS
                if math.isfinite(values.get(k, math.nan))
            )
            image = _outlined(s.images[v], s.mask) if v in s.images else None
            cells += f"<td>{_img_tag(image) if image is not None else ''}<div class='cap'>{cap}</div></td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<table class='grid'>{head}{''.join(rows)}</table>"


def _outlined(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """`image` with the mask's border drawn in magenta (2 px), so a reader sees which region may change."""
    if mask is None:
        return image
    binary = mask.convert("L").resize(image.size, Image.Resampling.NEAREST).point(lambda v: 255 if v >= 128 else 0)
    border = ImageChops.difference(binary.filter(ImageFilter.MaxFilter(3)), binary.filter(ImageFilter.MinFilter(3)))
    out = Image.fromarray(to_rgb_array(image))
    out.paste((255, 0, 255), (0, 0), border)
    return out


def _img_tag(image: Image.Image, side: int = 512) -> str:
    """Inline a copy at most `side` px per edge: full-size 1 MP images would make the page tens of MB. Transparency
    is shown over white, as the metrics score it and a JPEG is written (RGB alone showed the colour under it)."""
    image = Image.fromarray(to_rgb_array(image))
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# ----------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    # A bare Figure on the Agg canvas: no pyplot global state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - the eval extra
    from matplotlib.figure import Figure  # noqa: PLC0415 - the eval extra

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _metric_plot(variants, summary) -> bytes:
    """One small bar chart per metric: variant means with their 95% intervals as error bars."""
    cols = min(3, len(summary))
    rows = math.ceil(len(summary) / cols)
    fig = _figure(3.6 * cols, 2.6 * rows)
    colours = [f"C{i}" for i in range(len(variants))]
    for i, (name, entry) in enumerate(summary.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        stats = [entry["variants"][v] for v in variants]
        means = [s["mean"] if math.isfinite(s["mean"]) else 0.0 for s in stats]
        errs = [
            [max(0.0, m - s["low"]) if math.isfinite(s["low"]) else 0.0 for m, s in zip(means, stats)],
            [max(0.0, s["high"] - m) if math.isfinite(s["high"]) else 0.0 for m, s in zip(means, stats)],
        ]
        ax.bar(range(len(variants)), means, yerr=errs, color=colours, capsize=4)
        ax.set_xticks(range(len(variants)), variants, rotation=20, fontsize=8)
        info = METRICS[name]
        ax.set_title(f"{info.label} {'↑' if info.higher_is_better else '↓'}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    return _to_png(fig)


def _checkpoint_plot(checkpoints, best) -> bytes:
    fig = _figure(6, 3)
    ax = fig.add_subplot()
    ordered = sorted((c for c in checkpoints if c.name != BASE), key=lambda c: c.step)
    ax.plot([c.step for c in ordered], [c.loss for c in ordered], "o-")
    for c in checkpoints:
        if c.name == BASE:
            ax.axhline(c.loss, color="grey", linestyle="--", label="base model")
        if c.name == best:
            ax.plot([c.step], [c.loss], "r*", markersize=14, label=f"best: {best}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=8)
    return _to_png(fig)


# ----------------------------------------------------------------------------------------- W&B


def log_to_wandb(
    project: str,
    run_name: str | None,
    out_dir: str | Path,
    samples: list[Sample],
    summary: dict,
    verdict: dict[str, dict],
) -> None:
    """One W&B run (job_type "eval"): a table with a row per prompt, seed and variant (image + its metrics), each
    variant's mean of each metric and each adapter's verdict line as summary values. Honours WANDB_MODE (offline
    writes under `out_dir`)."""
    import wandb  # noqa: PLC0415 - wandb only for tracking.backend: wandb (a slow import)

    variants = _variants(samples)
    names = [m for m in METRICS if m in summary]
    table = wandb.Table(columns=["kind", "prompt", "seed", "variant", "image", *names])
    for s in samples:
        for v in variants:
            metrics = s.metrics.get(v, {})
            table.add_data(s.kind, s.prompt, s.seed, v, wandb.Image(s.images[v]), *(metrics.get(m) for m in names))
    # Each image also goes in as plain media: offline runs keep those as files, while table cells only sync online.
    images = {
        f"eval/{s.kind}_{i}_seed{s.seed}/{v}": wandb.Image(s.images[v], caption=s.prompt)
        for i, s in enumerate(samples)
        for v in variants
    }
    run = wandb.init(project=project, name=run_name, job_type="eval", dir=str(out_dir), reinit="finish_previous",
                     settings=WANDB_SETTINGS)  # fmt: skip
    try:
        run.log({"eval/samples": table, **images})
        for adapter, v in verdict.items():
            run.summary[f"eval/verdict/{adapter}"] = v["line"]
        for m in names:
            for v, interval in summary[m]["variants"].items():
                run.summary[f"eval/{m}/{v}"] = interval["mean"]
    finally:
        run.finish()
