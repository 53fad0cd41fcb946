"""The evaluation report: JSON numbers read back, HTML self-contained and rendered by a real browser."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from qwen_image_lora.eval import report
from qwen_image_lora.eval.report import _img_tag, _outlined, write_report
from qwen_image_lora.eval.summary import METRICS, CheckpointScore, Sample, best_checkpoint, summarise, verdicts

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _synthetic_samples(n: int = 6) -> list[Sample]:
    """Base images grey, adapter images red; the adapter's palette distance is lower by about 10 ΔE."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        grey = Image.new("RGB", (96, 64), (120 + 10 * i, 120, 120))
        red = Image.new("RGB", (96, 64), (200, 30 + 10 * i, 40))
        base = {"palette_delta_e": 30 + rng.normal(0, 3), "ssim": math.nan}
        adapter = {"palette_delta_e": base["palette_delta_e"] - 10 + rng.normal(0, 0.5), "ssim": math.nan}
        samples.append(
            Sample(
                "t2i",
                f'a qwnbrand mug #{i} that says "SALE"',
                seed=i,
                images={"base": grey, "brand": red},
                metrics={"base": base, "brand": adapter},
            )
        )
    edit_source = Image.new("RGB", (96, 64), "white")
    samples.append(
        Sample(
            "edit",
            "replace the background with a beach",
            seed=0,
            source=edit_source,
            images={"base": edit_source, "brand": Image.new("RGB", (96, 64), (250, 240, 200))},
            metrics={"base": {"ssim": 1.0, "psnr": 100.0}, "brand": {"ssim": 0.8, "psnr": 31.0}},
        )
    )
    return samples


def test_summary_has_paired_deltas_and_drops_unscored_metrics():
    # One more sample scored for base alone (no adapter image): unscored for the adapter, not a crash.
    base_only = Sample("t2i", "p", 9, images={"base": Image.new("RGB", (8, 8))}, metrics={"base": {"ssim": 0.5}})
    summary = summarise([*_synthetic_samples(), base_only], ["base", "brand"])
    assert set(summary) == {"palette_delta_e", "ssim", "psnr"}  # nothing else was scored
    delta = summary["palette_delta_e"]["delta"]["brand"]
    assert delta["n"] == 6 and delta["mean"] == pytest.approx(-10, abs=1) and delta["high"] < 0
    assert summary["ssim"]["variants"]["brand"]["n"] == 1  # NaNs (t2i samples) are not counted
    assert summary["ssim"]["variants"]["base"]["n"] == 2 and summary["ssim"]["delta"]["brand"]["n"] == 1


def test_report_json_and_html(tmp_path):
    checkpoints = [
        CheckpointScore("checkpoint-20", 20, 0.52),
        CheckpointScore("checkpoint-40", 40, 0.47),
        CheckpointScore("checkpoint-60", 60, 0.49),
    ]
    html_path, json_path = write_report(
        tmp_path / "eval",
        _synthetic_samples(),
        notes=["CLIPScore skipped: no model"],
        checkpoints=checkpoints,
        config={"seed": 0},
    )
    data = json.loads(json_path.read_text())  # strict JSON: NaN would have been written as null
    assert data["variants"] == ["base", "brand"]
    assert data["best_checkpoint"] == "checkpoint-40"
    assert data["metrics"]["palette_delta_e"]["delta"]["brand"]["high"] < 0
    assert data["samples"][0]["metrics"]["base"]["ssim"] is None
    assert len(data["samples"]) == 7 and data["notes"] == ["CLIPScore skipped: no model"]
    page = html_path.read_text()
    # One edit sample: SSIM has a mean but no interval, shown as a dash, never "nan".
    table = page[page.index("<h2>Metrics") : page.index("<img", page.index("<h2>Metrics"))]
    assert f"{0.8:.3g} <small>[–, –]</small>" in table and "nan" not in table.lower()
    assert "src='http" not in page and 'src="http' not in page  # nothing fetched from outside
    assert page.count("data:image/jpeg;base64,") == 7 * 2 + 1  # two variants per sample + the edit source
    assert page.count("data:image/png;base64,") == 2  # metric plot + checkpoint plot
    assert "CLIPScore skipped" in page and "checkpoint-40 (best)" in page
    assert not list((tmp_path / "eval").glob(".*"))  # no temp files left behind


def test_no_checkpoint_is_named_best_when_none_beats_the_base_model(tmp_path):
    """A run whose checkpoints all scored far above the base model's held-out loss (3.9 against 4.5e5 and up) still
    had a "best" one, and the report showed no base model to compare with."""
    diverged = [CheckpointScore("base", 0, 3.9), CheckpointScore("step-2", 2, 4.5e5), CheckpointScore("step-4", 4, 3e8)]
    assert best_checkpoint(diverged) == (
        None, "no checkpoint beats the base model by held-out loss: base 3.9, the lowest step-2 (step 2) 4.5e+05"
    )  # fmt: skip
    html_path, json_path = write_report(tmp_path, _synthetic_samples(), checkpoints=diverged)
    data = json.loads(json_path.read_text())
    assert data["best_checkpoint"] is None and data["checkpoint_verdict"].startswith("no checkpoint beats")
    page = html_path.read_text()
    assert "base model (no adapter)" in page and "(best)" not in page
    learned = [*diverged, CheckpointScore("step-6", 6, 3.5)]
    assert best_checkpoint(learned) == ("step-6", "best by held-out loss: step-6 (step 6, loss 3.5, base 3.9)")
    assert best_checkpoint([CheckpointScore("base", 0, 1.0), CheckpointScore("s", 1, 1.0)])[0] is None  # a tie
    assert best_checkpoint([CheckpointScore("s", 1, 1.0)]) == ("s", "best by held-out loss: s (step 1, loss 1)")
    assert best_checkpoint([CheckpointScore("base", 0, 1.0), CheckpointScore("s", 1, math.nan)]) == (
        None, "no checkpoint has a finite held-out loss (the notes and the table say why)"
    )  # fmt: skip
    # A base model whose own loss is not finite left every checkpoint "not beating" it ("base nan").
    assert best_checkpoint([CheckpointScore("base", 0, math.nan), CheckpointScore("s", 1, 1.5)]) == (
        "s", "best by held-out loss: s (step 1, loss 1.5); the base model's loss is nan (not finite), so nothing is "
        "compared with it"
    )  # fmt: skip
    # Named best by a hair, it read "loss 0.3, base 0.3": the digits that tell them apart are shown.
    hair = [CheckpointScore("base", 0, 0.3), CheckpointScore("step-5", 5, 0.2999999)]
    assert best_checkpoint(hair)[1] == "best by held-out loss: step-5 (step 5, loss 0.2999999, base 0.3)"
    # A checkpoint whose loss overflowed to NaN is not ranked: min() over a NaN depended on the list's order.
    for order in (1, -1):
        scores = [CheckpointScore("step-2", 2, math.nan), CheckpointScore("final (EMA)", 4, 3.77)][::order]
        assert best_checkpoint([CheckpointScore("base", 0, 4.09), *scores])[0] == "final (EMA)"


def test_a_second_report_keeps_the_first_beside_it(tmp_path, caplog):
    """eval replaced report.json and report.html silently: another adapter's report, or a checkpoint's, was gone."""
    first = write_report(tmp_path, _synthetic_samples(), title="first")
    before = {p.name: p.read_bytes() for p in first}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(first[1].stat().st_mtime))
    with caplog.at_level(logging.INFO):
        write_report(tmp_path, _synthetic_samples(), title="second")
        write_report(tmp_path, _synthetic_samples(), title="third")  # within the same second: its own name
    assert json.loads((tmp_path / "report.json").read_text())["title"] == "third"
    kept = {p.name: p.read_bytes() for p in tmp_path.glob(f"report-{stamp}.*")}
    assert kept == {f"report-{stamp}.json": before["report.json"], f"report-{stamp}.html": before["report.html"]}
    assert len(list(tmp_path.glob("report-*.json"))) == 2
    assert f"kept the previous report as report-{stamp}.json, report-{stamp}.html" in caplog.text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    html_path, _ = write_report(
        tmp_path / "eval",
        _synthetic_samples(),
        checkpoints=[CheckpointScore("checkpoint-20", 20, 0.5), CheckpointScore("checkpoint-40", 40, 0.4)],
    )
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            html_path.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    # Non-blank: many distinct colours (text, plots, images), not a white page.
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


def _paired(metric_deltas: dict[str, list[float]]) -> list[Sample]:
    """Samples whose adapter - base difference per metric is exactly the given list (base values fixed at 50)."""
    n = len(next(iter(metric_deltas.values())))
    image = Image.new("RGB", (8, 8))
    return [
        Sample(
            "t2i",
            "p",
            i,
            images={"base": image, "brand": image},
            metrics={
                "base": {m: 50.0 for m in metric_deltas},
                "brand": {m: 50.0 + d[i] for m, d in metric_deltas.items()},
            },
        )
        for i in range(n)
    ]


def test_verdict_says_better_worse_or_unclear_per_metric_from_the_paired_interval(tmp_path):
    samples = _paired({
        "palette_delta_e": [-3.0, -3.5, -2.8, -3.2, -2.9, -3.1],  # lower is better: clearly better
        "ssim": [-0.20, -0.25, -0.18, -0.22, -0.21, -0.19],       # higher is better: clearly worse
        "shift_px": [2.0, -2.0, 1.5, -1.5, 0.5, -0.5],            # the interval spans zero
    })  # fmt: skip
    summary = summarise(samples, ["base", "brand"])
    found = verdicts(summary, ["brand"], {"text accuracy": "no quoted text in the prompts"})
    brand = found["brand"]
    assert {m: v["verdict"] for m, v in brand["metrics"].items()} == {
        "palette_delta_e": "better",
        "ssim": "worse",
        "shift_px": "no clear difference",
    }
    line = brand["line"]
    assert line.startswith("brand: better palette distance (ΔE -3.08, CI ")
    assert "worse edit preservation SSIM (-0.208, CI " in line
    assert "no clear difference in edit shift" in line
    assert line.endswith("not measured: text accuracy (no quoted text in the prompts)")

    # Below MIN_PAIRS no verdict, however clear the few pairs look; the line says how many and what to add.
    few = verdicts(summarise(samples[:2], ["base", "brand"]), ["brand"])["brand"]
    assert {v["verdict"] for v in few["metrics"].values()} == {"too few samples"}
    assert "too few samples for palette distance (n=2), " in few["line"]
    assert "a verdict needs 6 pairs; add eval.seeds" in few["line"] and "better" not in few["line"]

    # Every output opens with the same line: JSON, HTML (above the notes and tables).
    html_path, json_path = write_report(
        tmp_path, samples, notes=["a note"], not_measured={"text accuracy": "no quoted text in the prompts"}
    )
    data = json.loads(json_path.read_text())
    assert list(data)[:2] == ["title", "verdicts"] and data["verdicts"]["brand"]["line"] == line
    assert data["verdicts"]["brand"]["not_measured"] == {"text accuracy": "no quoted text in the prompts"}
    page = html_path.read_text()
    assert page.index(html.escape(line)) < page.index("a note") < page.index("<h2>Metrics")


def _t_interval(deltas: list[float], metrics: int = 1) -> tuple[float, float, float]:
    """The paired t-interval by hand, at the verdict's level: 95% together over `metrics` (each 1 - 0.05/metrics)."""
    d = np.asarray(deltas)
    half = stats.t.ppf(1 - 0.025 / metrics, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def test_verdict_line_gives_each_difference_its_sign_and_both_ends_of_its_interval():
    deltas = {
        "palette_delta_e": [-3.0, -3.5, -2.8, -3.2, -2.9, -3.1],  # lower is better: better, negative
        "text_cer": [0.02, -0.02, 0.01, -0.01, 0.005, -0.005],    # spans zero (but not 1): unclear
        "ssim": [0.04, 0.05, 0.06, 0.05, 0.045, 0.055],           # higher is better, up by less than 1: better
        "psnr": [-2.0, -2.5, -1.8, -2.2, -2.1, -1.9],             # higher is better, down: worse
        "shift_px": [0.0] * 6,                                    # identical to base: no difference at all
    }  # fmt: skip
    not_measured = {"CLIPScore": "eval.clip_model is not set", "text accuracy": "no quoted text in the prompts"}
    brand = verdicts(summarise(_paired(deltas), ["base", "brand"]), ["brand"], not_measured)["brand"]
    assert {m: v["verdict"] for m, v in brand["metrics"].items()} == {
        "palette_delta_e": "better",
        "text_cer": "no clear difference",
        "ssim": "better",
        "psnr": "worse",
        "shift_px": "no clear difference",  # a zero-width interval at 0 is not "worse"
    }

    def part(word: str, name: str, metric: str, symbol: str = "", unit: str = "") -> str:
        mean, low, high = _t_interval(deltas[metric], metrics=len(deltas))
        return f"{word} {name} ({symbol}{mean:+.3g}{unit}, CI {low:.3g}..{high:.3g}{unit})"

    assert brand["line"] == "brand: " + "; ".join([
        part("better", "palette distance", "palette_delta_e", symbol="ΔE "),
        part("better", "edit preservation SSIM", "ssim"),
        part("worse", "edit preservation PSNR", "psnr", unit=" dB"),  # it read "(dB -2.08, CI -2.49..-1.67)"
        "no clear difference in text CER, edit shift",
        "not measured: CLIPScore (eval.clip_model is not set), text accuracy (no quoted text in the prompts)",
    ])  # fmt: skip
    assert "(+0.05, CI " in brand["line"]  # the sign of an increase is written out


def test_the_edit_mask_is_outlined_over_the_pair():

    image = Image.new("RGB", (40, 20), (10, 10, 10))
    mask = Image.new("L", (40, 20), 0)
    mask.paste(255, (20, 0, 40, 20))
    out = np.asarray(_outlined(image, mask))
    assert (out[:, 19:21] == (255, 0, 255)).all()  # the border between kept and changed
    assert (out[:, :10] == 10).all() and (out[:, 30:] == 10).all()  # away from it the image is untouched
    assert _outlined(image, None) is image


def test_the_report_shows_transparency_over_white_as_the_metrics_score_it():
    """Thumbnails dropped alpha (`convert("RGB")`): a render ~50% transparent showed the colour under it, an image no
    edge writes, while the metrics composite it on white."""
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # transparent black
    image.paste((200, 30, 30, 255), (0, 0, 20, 20))
    tag = _img_tag(image)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(tag.split("base64,")[1]))).convert("RGB")).astype(int)
    assert np.abs(shown[10, 35] - 255).max() <= 3 and np.abs(shown[10, 5] - (200, 30, 30)).max() <= 8
    outlined = np.asarray(_outlined(image, Image.new("L", (40, 20), 255)))
    assert (outlined[10, 35] == 255).all()


def test_a_variants_interval_stays_within_what_its_metric_can_be():
    """With few samples a t-interval crossed a metric's limits: 'Edit shift (px) 40 [-33.7, 114]'."""
    samples = [
        Sample("edit", "p", seed, {}, {"base": {"shift_px": shift, "ssim": ssim}, "a": {"shift_px": 1.0, "ssim": 0.5}})
        for seed, shift, ssim in ((0, 0.0, 0.99), (1, 80.0, 0.2))
    ]
    summary = summarise(samples, ["base", "a"])
    shift, ssim = summary["shift_px"], summary["ssim"]
    assert shift["variants"]["base"]["low"] == 0 and shift["variants"]["base"]["high"] > 80
    assert ssim["variants"]["base"]["high"] == 1 and ssim["variants"]["base"]["low"] < 0.2
    assert shift["delta"]["a"]["low"] < -39  # a difference takes either sign: its interval is not cut
    samples[0].metrics["a"].pop("ssim"), samples[1].metrics["a"].pop("ssim")
    unscored = summarise(samples, ["base", "a"])["ssim"]["variants"]["a"]  # no value: no interval, not [-1, 1]
    assert math.isnan(unscored["low"]) and math.isnan(unscored["high"])


def test_pairs_that_all_differ_alike_have_no_interval_and_the_sign_test_decides(tmp_path):
    """Eight word-accuracy differences of exactly 1 read 'better (+1, CI 1..1)': an interval claiming the mean exact.
    Without spread there is no interval; n pairs all one way is the exact sign test's p = 2 / 2^n."""
    n = 8
    summary = summarise(_paired({"text_word_accuracy": [1.0] * n, "shift_px": [0.0] * n}), ["base", "brand"])
    assert stats.binomtest(n, n).pvalue == pytest.approx(2 / 2**n)
    brand = verdicts(summary, ["brand"])["brand"]
    assert (
        brand["line"] == f"brand: better text word accuracy (+1, in all {n} pairs); no clear difference in edit shift"
    )
    assert math.isnan(brand["metrics"]["text_word_accuracy"]["low"]) and brand["metrics"]["shift_px"]["all_equal"]
    few = verdicts(summarise(_paired({"psnr": [-2.0] * 5}), ["base", "brand"]), ["brand"])["brand"]
    assert few["line"].startswith("brand: too few samples for edit preservation PSNR (n=5)")  # p = 1/16 anyway
    six = verdicts(summarise(_paired({"psnr": [-2.0] * 6}), ["base", "brand"]), ["brand"])["brand"]
    assert six["line"] == "brand: worse edit preservation PSNR (-2 dB, in all 6 pairs)"  # it read "dB -2"
    spread = verdicts(summarise(_paired({"shift_px": [-1.0, -2, -1, -2, -1, -2]}), ["base", "brand"]), ["brand"])
    assert spread["brand"]["line"] == "brand: better edit shift (-1.5 px, CI -2.07..-0.925 px)"
    # With a second metric each is judged at 97.5%: six pairs one way (p = 1/32) no longer decide.
    two = verdicts(summarise(_paired({"psnr": [-2.0] * 6, "ssim": [0.1] * 6}), ["base", "brand"]), ["brand"])
    assert two["brand"]["line"] == "brand: no clear difference in edit preservation SSIM, edit preservation PSNR"
    html_path, json_path = write_report(tmp_path, _paired({"psnr": [-2.0] * 6}))
    assert "<small>all 6 equal</small>" in html_path.read_text()
    assert json.loads(json_path.read_text())["metrics"]["psnr"]["delta"]["brand"]["low"] is None


def test_a_metric_with_too_few_pairs_for_a_verdict_does_not_widen_the_others_intervals():
    """Bonferroni counted every metric measured: an edit example at two seeds (never enough for a verdict) moved the
    palette's interval from 95% to 97.5% and its verdict from better to no clear difference."""
    samples = _paired({"palette_delta_e": [-1.0, -1.2, -0.9, -1.1, -1.0, -0.8, -1.3, -0.95]})
    for i, sample in enumerate(samples):  # the base scored on all 8, the adapter on 2: two pairs
        sample.metrics["base"]["psnr"], sample.metrics["brand"]["psnr"] = 30.0, 31.0 if i < 2 else math.nan
    summary = summarise(samples, ["base", "brand"])
    assert summary["palette_delta_e"]["delta"]["brand"]["confidence"] == pytest.approx(0.95)
    assert summary["psnr"]["delta"]["brand"]["n"] == 2
    for sample in samples[2:6]:  # six pairs of psnr: now it can decide, and both share the 5%
        sample.metrics["brand"]["psnr"] = 30.5
    assert summarise(samples, ["base", "brand"])["palette_delta_e"]["delta"]["brand"]["confidence"] == 0.975
    alone = summarise(samples, ["brand"])  # no base model: each variant's interval, no deltas to count pairs for
    assert alone["palette_delta_e"]["delta"] == {} and alone["palette_delta_e"]["variants"]["brand"]["n"] == 8


def test_an_adapter_with_nothing_measured_still_gets_its_line(tmp_path):
    """The verdict listed only adapters with a metric, so with none its line (and 'not measured: ...') vanished."""
    image = Image.new("RGB", (8, 8))
    samples = [
        Sample("t2i", "p", seed, {"base": image, "brand": image}, {"base": {}, "brand": {}}) for seed in range(6)
    ]
    not_measured = {"palette": "eval.palette is not set"}
    _, json_path = write_report(tmp_path, samples, not_measured=not_measured)
    line = json.loads(json_path.read_text())["verdicts"]["brand"]["line"]
    assert line == "brand: nothing measured; not measured: palette (eval.palette is not set)"


def test_intervals_keep_within_every_bounded_metrics_limits():
    """Text CER [1, 1, 1, 1, 1, 0.2] read [0.52, 1.21] (it is capped at 1); PSNR and CLIPScore passed their caps; a
    similarity of 1 + 1e-7 (float error) sat above its own interval cut at 1."""
    image = Image.new("RGB", (8, 8))
    values = {"text_cer": [1, 1, 1, 1, 1, 0.2], "psnr": [100] * 5 + [60], "clip_score": [100] * 5 + [60],
              "reference_similarity": [1.0000001] * 6}  # fmt: skip
    samples = [
        Sample("t2i", "p", i, {"base": image}, {"base": {m: float(v[i]) for m, v in values.items()}}) for i in range(6)
    ]
    summary = summarise(samples, ["base"])
    for metric, top in (("text_cer", 1), ("psnr", 100), ("clip_score", 100), ("reference_similarity", 1)):
        entry = summary[metric]["variants"]["base"]
        assert not entry["high"] > top and entry["mean"] <= top, metric  # all equal: no interval (NaN)
    assert stats.ttest_1samp(values["text_cer"], 0).confidence_interval().high > 1  # the cut is needed


def test_a_report_that_fails_to_render_leaves_the_previous_pair_as_it_was(tmp_path, monkeypatch):
    """The old pair was moved aside and the JSON written before the page was made: a failure left a new JSON beside
    no report.html."""
    write_report(tmp_path, _synthetic_samples())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args):
        raise RuntimeError("render failed")

    monkeypatch.setattr(report, "_render_html", broken)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(tmp_path, _synthetic_samples())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_report_is_utf8_whatever_the_locale(tmp_path):
    """The page always holds 'Δ', '↑' and '–': under LANG=C it failed with UnicodeEncodeError."""
    code = (
        "import sys; from qwen_image_lora.io import atomic_write_text; "
        "atomic_write_text(sys.argv[1], '\\u0394E \\u2191 \\u2013')"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.html")], env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").read_bytes() == "ΔE ↑ –".encode()


def test_an_adapter_that_changes_nothing_reads_better_or_worse_somewhere_at_most_5_percent_of_the_time():
    """Each metric's interval at 95% alone: with nine metrics and no real difference, 38% of verdict lines called
    some metric better or worse. Together (each at 1 - 0.05/9) it is at most 5% (4.9% for independent metrics)."""
    rng = np.random.default_rng(11)
    draws, called = 300, 0
    for _ in range(draws):
        deltas = {name: list(rng.normal(0.0, 1.0, 8)) for name in METRICS}
        brand = verdicts(summarise(_paired(deltas), ["base", "brand"]), ["brand"])["brand"]
        called += any(m["verdict"] in ("better", "worse") for m in brand["metrics"].values())
    assert called / draws <= 0.095  # 5% + 3.5 standard errors of 300 draws
