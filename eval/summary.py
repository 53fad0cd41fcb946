"""The numbers behind the evaluation report: per metric each variant's mean and Student-t 95% interval, each
adapter's paired difference to the base model (intervals that hold together over the metrics), and `verdicts`, the
line every output opens with: per adapter, each metric better, worse, not clearly different from base by that
interval, or too few samples to say, and what was not measured and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image
from scipy import stats

from qwen_image_lora.eval.metrics import PSNR_CAP_DB, Interval, mean_ci, paired_difference_ci

BASE = "base"


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: bool
    unit: str = ""  # after the number ("+1.13 dB"); a symbol such as ΔE goes before it (`symbol`)
    short: str = ""  # its name in the verdict line
    symbol: bool = False
    # The values it can take: a variant's interval is cut to them (a t-interval of a distance read [-33.7, 114] px).
    bounds: tuple[float, float] = (0.0, math.inf)


# Every metric the evaluator may emit, in display order. A metric with no finite value is left out.
METRICS: dict[str, MetricInfo] = {
    "clip_score": MetricInfo("CLIPScore", True, short="CLIPScore", bounds=(0, 100)),
    "reference_similarity": MetricInfo("Reference similarity", True, short="reference similarity", bounds=(-1, 1)),
    "palette_delta_e": MetricInfo("CIEDE2000 palette distance", False, "ΔE", short="palette distance", symbol=True),
    "text_cer": MetricInfo("Text CER", False, short="text CER", bounds=(0, 1)),
    "text_word_accuracy": MetricInfo("Text word accuracy", True, short="text word accuracy", bounds=(0, 1)),
    "ssim": MetricInfo("Preservation SSIM", True, short="edit preservation SSIM", bounds=(-1, 1)),
    "psnr": MetricInfo("Preservation PSNR", True, "dB", short="edit preservation PSNR", bounds=(0, PSNR_CAP_DB)),
    "shift_px": MetricInfo("Edit shift", False, "px", short="edit shift"),
    "scale_error": MetricInfo("Edit zoom |scale - 1|", False, short="edit zoom"),
}
BETTER, WORSE, UNCLEAR, TOO_FEW = "better", "worse", "no clear difference", "too few samples"
# Paired samples a metric needs before a verdict says better or worse: below it even a valid interval is too wide
# to mean much, and one or two lucky seeds decide.
MIN_PAIRS = 6
# The chance that a verdict line calls any metric better or worse when the adapter changes nothing (`summarise`).
FAMILY_ERROR = 0.05


@dataclass
class Sample:
    """One prompt at one seed. `images` and `metrics` are keyed by variant: "base", then adapter names."""

    kind: str  # "t2i" or "edit"
    prompt: str
    seed: int
    images: dict[str, Image.Image]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    source: Image.Image | None = None  # the edit's input image (the last reference)
    mask: Image.Image | None = None  # the edit's region mask (white = may change), outlined over the pair


@dataclass
class CheckpointScore:
    name: str  # BASE for the base model's own row (step 0: a LoRA starts as the base model)
    step: int
    loss: float


def best_checkpoint(scores: list[CheckpointScore]) -> tuple[str | None, str]:
    """The checkpoint with the lowest held-out loss and the line that says so. With the base model's row among the
    scores, a checkpoint must be below it to be named: a run whose every checkpoint is worse than the base model has
    no best one (it was named "best" without a word about the base)."""
    base = next((c for c in scores if c.name == BASE), None)
    trained = [c for c in scores if c.name != BASE and math.isfinite(c.loss)]  # a NaN loss made min() order-dependent
    if not trained:
        return None, "no checkpoint has a finite held-out loss (the notes and the table say why)"
    best = min(trained, key=lambda c: c.loss)
    if base is not None and not math.isfinite(base.loss):  # it read "no checkpoint beats the base model: base nan"
        return best.name, (f"best by held-out loss: {best.name} (step {best.step}, loss {best.loss:.5g}); the base "
                           f"model's loss is {base.loss} (not finite), so nothing is compared with it")  # fmt: skip
    shown, base_shown = _apart(best.loss, base.loss if base is not None else best.loss)
    if base is not None and not best.loss < base.loss:
        return None, (
            f"no checkpoint beats the base model by held-out loss: base {base_shown}, the lowest {best.name} "
            f"(step {best.step}) {shown}"
        )
    against = f", base {base_shown}" if base is not None else ""
    return best.name, f"best by held-out loss: {best.name} (step {best.step}, loss {shown}{against})"


def _apart(a: float, b: float) -> tuple[str, str]:
    """Two losses with the digits that tell them apart (5 at least): 'loss 0.3, base 0.3' named a best checkpoint."""
    for digits in range(5, 18):
        if f"{a:.{digits}g}" != f"{b:.{digits}g}" or a == b:
            break
    return f"{a:.{digits}g}", f"{b:.{digits}g}"


# ----------------------------------------------------------------------------------------- numbers


def summarise(samples: list[Sample], variants: list[str]) -> dict:
    """Per metric: each variant's mean and 95% CI, and each adapter's paired delta vs base with its interval. The
    deltas' intervals hold together: with m metrics measured, each is at 1 - 0.05/m (Bonferroni), so an adapter that
    changes nothing reads better or worse in any metric at most 5% of the time (m counts the metrics with enough pairs
    for a verdict). Each at 95%, nine metrics gave a
    line with some "better" or "worse" in 38% of such evaluations.

    Returns {metric: {"variants": {variant: Interval-dict}, "delta": {adapter: Interval-dict}}}.
    """
    series = {
        name: {v: [s.metrics.get(v, {}).get(name, math.nan) for s in samples] for v in variants} for name in METRICS
    }
    measured = [name for name in METRICS if any(math.isfinite(x) for xs in series[name].values() for x in xs)]
    # Only the metrics that can reach a verdict (MIN_PAIRS pairs for some adapter) share the 5%: one edit example at
    # two seeds (too few to judge) moved the palette's verdict from better to no clear difference.
    adapters = [v for v in variants if v != BASE] if BASE in variants else []
    decidable = [name for name in measured if any(_pairs(series[name], v) >= MIN_PAIRS for v in adapters)]
    confidence = 1 - FAMILY_ERROR / max(1, len(decidable))
    out = {}
    for name in measured:
        bounds = METRICS[name].bounds
        entry = {"variants": {v: _interval(mean_ci(xs), bounds) for v, xs in series[name].items()}, "delta": {}}
        if BASE in series[name]:
            for v in variants:
                if v != BASE:
                    ci = paired_difference_ci(series[name][v], series[name][BASE], confidence)
                    entry["delta"][v] = {**_interval(ci), "confidence": confidence}
        out[name] = entry
    return out


def _pairs(series: dict[str, list[float]], adapter: str) -> int:
    """How many items have a finite value for both `adapter` and the base model."""
    return sum(math.isfinite(a) and math.isfinite(b) for a, b in zip(series[adapter], series[BASE], strict=True))


def compare(metric: str, delta: dict) -> str:
    """BETTER or WORSE than base when the paired interval of (adapter - base) excludes zero, UNCLEAR when it does
    not, TOO_FEW below MIN_PAIRS pairs. Pairs that all differ by the same amount have no interval: the exact sign
    test decides at the interval's level (n pairs all one way: p = 2 / 2^n)."""
    low, high = delta["low"], delta["high"]
    if delta["n"] < MIN_PAIRS:
        return TOO_FEW
    if delta["all_equal"]:
        if delta["mean"] == 0 or stats.binomtest(delta["n"], delta["n"]).pvalue >= 1 - delta["confidence"]:
            return UNCLEAR
    elif not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
        return UNCLEAR
    return BETTER if (delta["mean"] > 0) == METRICS[metric].higher_is_better else WORSE


def verdicts(summary: dict, adapters: list[str], not_measured: dict[str, str] | None = None) -> dict[str, dict]:
    """One verdict per adapter against base, from `summarise`'s paired deltas: the line every output opens with
    (report, JSON, CLI, W&B) and its parts. `not_measured`: what was not scored -> why (e.g. no quoted text).

        brand: better palette distance (ΔE -3.1, CI -4..-2.2); no clear difference in edit shift; not measured: ...
    """
    out = {}
    for adapter in adapters:
        metrics = {
            m: {"verdict": compare(m, e["delta"][adapter]), **e["delta"][adapter]}
            for m, e in summary.items()
            if adapter in e["delta"]
        }
        parts = []
        for word in (BETTER, WORSE):
            for m, d in metrics.items():
                if d["verdict"] == word:
                    info = METRICS[m]
                    before, after = (f"{info.unit} ", "") if info.symbol else ("", f" {info.unit}" if info.unit else "")
                    sign = "+" if d["mean"] > 0 else ""
                    spread = (f"in all {d['n']} pairs" if d["all_equal"]
                              else f"CI {fmt(d['low'])}..{fmt(d['high'])}{after}")  # fmt: skip
                    # "+1.13 dB, CI 0.927..1.34 dB" (it read "dB +1.13"); a symbol reads before: "ΔE -2.29"
                    parts.append(f"{word} {info.short} ({before}{sign}{fmt(d['mean'])}{after}, {spread})")
        unclear = [METRICS[m].short for m, d in metrics.items() if d["verdict"] == UNCLEAR]
        if unclear:
            parts.append(f"{UNCLEAR} in {', '.join(unclear)}")
        too_few = [f"{METRICS[m].short} (n={d['n']})" for m, d in metrics.items() if d["verdict"] == TOO_FEW]
        if too_few:
            parts.append(f"{TOO_FEW} for {', '.join(too_few)}: a verdict needs {MIN_PAIRS} pairs; add eval.seeds")
        if not metrics:
            parts.append("nothing measured")
        if not_measured:
            parts.append("not measured: " + ", ".join(f"{what} ({why})" for what, why in not_measured.items()))
        out[adapter] = {
            "line": f"{adapter}: " + "; ".join(parts),
            "metrics": metrics,
            "not_measured": dict(not_measured or {}),
        }
    return out


def _interval(ci: Interval, bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """`bounds` cut a variant's own interval and mean (a similarity of 1 + 1e-7 read above its interval cut at 1); a
    paired difference takes either sign and keeps its whole interval."""
    # NaN (no samples) stays NaN: max and min keep their first argument when a comparison with it is false.
    cut = {k: min(max(getattr(ci, k), bounds[0]), bounds[1]) for k in ("mean", "low", "high")}
    return {**cut, "n": ci.n, "all_equal": ci.all_equal}


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"
