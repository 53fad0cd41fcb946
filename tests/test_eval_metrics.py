"""Evaluation metrics on synthetic images whose right answers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage, stats
from skimage.transform import AffineTransform, warp
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from qwen_image_lora.config import load_config
from qwen_image_lora.eval import evaluator
from qwen_image_lora.eval import metrics as M
from qwen_image_lora.eval.summary import Sample
from qwen_image_lora.eval_config import EditExample
from tests.unchosen import unchosen_seeds

SIZE = 256


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """A smooth random RGB texture, (400, 400, 3) uint8, larger than the crops cut from it."""

    noise = ndimage.gaussian_filter(np.random.default_rng(0).random((400, 400, 3)), (2, 2, 0))
    return ((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8)


def _crop(img: np.ndarray, top: int = 72, left: int = 72) -> np.ndarray:
    return img[top : top + SIZE, left : left + SIZE]


def _font(size: int) -> ImageFont.FreeTypeFont:
    dejavu = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    return ImageFont.truetype(str(dejavu), size) if dejavu.exists() else ImageFont.load_default(size=size)


# ----------------------------------------------------------------------------------------- palette


def test_palette_distance_is_zero_on_palette_and_large_off_it():
    flat = np.zeros((64, 64, 3), np.uint8)
    flat[:] = (227, 6, 19)  # the brand red
    assert M.palette_distance(flat, ["#E30613", "#ffffff"]) == pytest.approx(0.0, abs=1e-6)
    assert M.palette_distance(flat, ["#00ffff"]) > 40  # cyan is red's complement


def test_palette_distance_weights_by_area():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[:, :16] = (0, 0, 255)  # a quarter blue, the rest white
    centres, shares = M.dominant_colours(img, k=4)
    assert len(centres) == 2 and shares == pytest.approx([0.75, 0.25])
    only_white = M.palette_distance(img, ["#ffffff"])
    both = M.palette_distance(img, ["#ffffff", "#0000ff"])
    assert both == pytest.approx(0.0, abs=1e-6)
    assert only_white == pytest.approx(0.25 * M.palette_distance(img[:, :16], ["#ffffff"]), rel=1e-3)


def test_palette_rejects_bad_colours():
    with pytest.raises(ValueError, match="hex colour"):
        M.palette_distance(np.zeros((8, 8, 3), np.uint8), ["red"])


# ----------------------------------------------------------------------------------------- preservation


def test_identical_images_are_fully_preserved(texture):
    img = _crop(texture)
    assert M.preservation(img, img) == {"ssim": pytest.approx(1.0), "psnr": M.PSNR_CAP_DB}


def test_preservation_ignores_the_masked_region(texture):
    src = _crop(texture)
    edited = src.copy()
    edited[:100] = 0
    mask = np.zeros(src.shape[:2], bool)
    mask[:100] = True
    masked = M.preservation(src, edited, mask)
    assert masked["ssim"] == pytest.approx(1.0) and masked["psnr"] == M.PSNR_CAP_DB
    whole = M.preservation(src, edited)
    assert whole["ssim"] < 0.8 and whole["psnr"] < 20
    # A mask given as an image works the same way.
    assert M.preservation(src, edited, Image.fromarray(mask.astype(np.uint8) * 255)) == masked


def test_preservation_of_a_strip_thinner_than_the_ssim_window_still_scores_only_the_strip(texture):
    src = _crop(texture)
    edited = src.copy()
    edited[:, 2:] = 255 - src[:, 2:]  # everything but a 2-px column inverted, and masked
    mask = np.ones(src.shape[:2], bool)
    mask[:, :2] = False
    strip, whole = M.preservation(src, edited, mask), M.preservation(src, edited)
    assert strip["psnr"] == M.PSNR_CAP_DB  # the kept column is untouched
    assert strip["ssim"] > whole["ssim"] + 0.2  # the inverted area is not averaged in


def test_preservation_masks_that_cannot_be_scored_are_refused_plainly(texture):
    src = _crop(texture)[:, :-8]  # not square, so a swapped width and height would show
    h, w = src.shape[:2]
    with pytest.raises(ValueError, match="^preservation: the mask covers the whole image, nothing is left to compare$"):
        M.preservation(src, src, np.ones((h, w), bool))
    with pytest.raises(ValueError, match=f"^preservation: mask is {w + 1}x{h}, images are {w}x{h}$"):
        M.preservation(src, src, np.zeros((h, w + 1), bool))


def test_preservation_rejects_size_mismatch(texture):
    with pytest.raises(ValueError, match="same size"):
        M.preservation(_crop(texture), texture)


# ----------------------------------------------------------------------------------------- alignment


def test_alignment_measures_a_shift(texture):
    src = _crop(texture)
    moved = _crop(texture, top=72 - 3, left=72 - 5)  # content 5 px right, 3 px down
    a = M.alignment(src, moved)
    assert a["dx"] == pytest.approx(5, abs=0.5) and a["dy"] == pytest.approx(3, abs=0.5)
    assert a["scale"] == pytest.approx(1.0, rel=0.01)


def test_alignment_measures_a_zoom(texture):

    c = np.array([texture.shape[1], texture.shape[0]]) / 2 - 0.5
    zoom = AffineTransform(translation=-c) + AffineTransform(scale=1.05) + AffineTransform(translation=c)
    zoomed = warp(texture, zoom.inverse, order=3, preserve_range=True).astype(np.uint8)
    a = M.alignment(_crop(texture), _crop(zoomed))
    assert a["scale"] == pytest.approx(1.05, rel=0.01)
    assert abs(a["dx"]) < 0.5 and abs(a["dy"]) < 0.5


def test_alignment_of_identical_images_is_identity(texture):
    assert M.alignment(_crop(texture), _crop(texture)) == {"dx": 0.0, "dy": 0.0, "scale": 1.0}


@pytest.mark.parametrize("colour", [0, 128])
def test_a_flat_output_has_no_alignment_rather_than_an_arbitrary_one(texture, colour):
    """An all-black output scored a 1 px shift (better than most real edits), a grey one 66 px: phase correlation
    of a flat image has no peak. Not scored (NaN), so the pair is left out of the edit shift."""
    src = _crop(texture)
    flat = np.full_like(src, colour)
    for a in (M.alignment(src, flat), M.alignment(flat, src)):
        assert all(math.isnan(v) for v in a.values())
    assert not math.isnan(M.alignment(src, np.clip(src.astype(int) + 40, 0, 255).astype(np.uint8))["dx"])


# ----------------------------------------------------------------------------------------- text


def test_quoted_text_finds_straight_and_curly_quotes():
    assert M.quoted_text('a poster that says "SUMMER SALE" and “50% OFF”') == ["SUMMER SALE", "50% OFF"]
    assert M.quoted_text("a red mug") == []


def test_text_accuracy_scores():
    assert M.text_accuracy("Summer Sale", "SUMMERSALE") == {"cer": 0.0, "word_accuracy": 1.0, "exact": 1.0}
    assert M.text_accuracy("SALE", "") == {"cer": 1.0, "word_accuracy": 0.0, "exact": 0.0}
    assert M.text_accuracy("SALE", "SALT")["cer"] == pytest.approx(0.25)
    assert M.edit_distance("kitten", "sitting") == 3


def test_ocr_reads_rendered_text_and_nothing_from_a_blank_image():
    prompt = 'a shop window with the words "SUMMER SALE 2025"'
    img = Image.new("RGB", (512, 192), "white")
    ImageDraw.Draw(img).text((24, 70), "SUMMER SALE 2025", fill="black", font=_font(44))
    score = M.prompt_text_accuracy(img, prompt)
    assert score["cer"] <= 0.1 and score["word_accuracy"] == 1.0
    blank = M.prompt_text_accuracy(Image.new("RGB", (512, 192), "white"), prompt)
    assert blank["cer"] == 1.0 and blank["word_accuracy"] == 0.0
    assert M.prompt_text_accuracy(img, "no quotes here") is None


# ----------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random 2-layer CLIP with a BPE tokenizer trained here, saved like a hub folder (nothing downloaded)."""

    path = tmp_path_factory.mktemp("clip")
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["a red logo on a white mug", "a summer sale poster"] * 4, trainer=trainer)
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    tokenizer = CLIPTokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=16)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            **special,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_scores_are_finite_and_self_similarity_is_one(tiny_clip, texture):
    scorer = M.ClipScorer(tiny_clip)
    img = _crop(texture)
    scores = scorer.clip_score([img, img], ["a red logo on a white mug", "a summer sale poster"])
    assert len(scores) == 2 and all(np.isfinite(s) and 0 <= s <= 100 for s in scores)
    same, other = scorer.image_similarity([img, img], [img.copy(), 255 - img])
    assert same == pytest.approx(1.0, abs=1e-5) and other < same


def test_an_edits_only_evaluation_says_why_clipscore_was_not_measured(tiny_clip, tmp_path):
    """CLIP scores text-to-image prompts only: with eval.clip_model set and only edits, CLIPScore went missing from
    the verdict's "not measured" without a word, and reference similarity blamed the unset eval.reference_images."""
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    edit = evaluator._Job("edit", "make it red", 0, EditExample(images=["in.png"], prompt="make it red"))
    samples = [Sample("edit", edit.prompt, 0, {"base": source, "brand": source}, source=source)]
    cfg = load_config(None, [f"eval.clip_model={tiny_clip}", "eval.palette=['#ff0000']"])
    not_measured = evaluator._score(samples, [edit], cfg, [], device="cpu")
    assert not_measured == {
        "CLIPScore and reference similarity": "scored on eval.prompts only, and there are none",
        "text accuracy": "no quoted text in the prompts",
    }
    assert "clip_score" not in samples[0].metrics["brand"] and samples[0].metrics["brand"]["psnr"] == M.PSNR_CAP_DB
    t2i = [Sample("t2i", "a mug", 0, {"base": source, "brand": source})]
    assert evaluator._score(t2i, [evaluator._Job("t2i", "a mug", 0)], cfg, [], device="cpu") == {
        "reference similarity": "eval.reference_images is not set",
        "text accuracy": "no quoted text in the prompts",
        "edit preservation": "no eval.edits",
    }
    assert 0 <= t2i[0].metrics["brand"]["clip_score"] <= 100


def test_clip_scorer_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.clip_model"):
        M.ClipScorer(tmp_path)


# ----------------------------------------------------------------------------------------- intervals


@pytest.mark.parametrize("n", [4, 8, 30])
@pytest.mark.parametrize("true_difference", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, *unchosen_seeds(1)])
def test_the_stated_95_percent_interval_covers_the_truth_95_percent_of_the_time_at_small_n(n, true_difference, seed):
    """2,000 paired evaluations with a known true difference (0, and one standard deviation): the paired interval
    must cover it in 93-97% of them, at n = 4 as at 30. (A percentile bootstrap covered ~80% at n = 4.) For a
    correct interval 93-97% is four standard errors either side, so a fresh seed fails about once in 15,000."""
    rng = np.random.default_rng([n, int(true_difference), seed])
    draws = 2000
    base = rng.normal(10.0, 3.0, size=(draws, n))  # per-item spread the pairing must cancel
    adapter = base + rng.normal(true_difference, 1.0, size=(draws, n))
    hits = sum(ci.low <= true_difference <= ci.high for ci in map(M.paired_difference_ci, adapter, base))
    assert 0.93 <= hits / draws <= 0.97


def test_intervals_drop_nans_and_need_two_values():
    ci = M.mean_ci([1.0, 2.0, np.nan, 4.0])
    assert ci.n == 3 and ci.mean == pytest.approx(7 / 3)
    # By hand: sem = sd / sqrt(3) with sd = 1.5275; t(0.975, 2) = 4.3027.
    assert (ci.low, ci.high) == pytest.approx(
        (7 / 3 - 4.3027 * 1.5275 / 3**0.5, 7 / 3 + 4.3027 * 1.5275 / 3**0.5), abs=1e-3
    )
    one = M.mean_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.low) and math.isnan(one.high) and one.n == 1
    none = M.mean_ci([])
    assert none.n == 0 and math.isnan(none.mean) and math.isnan(none.low) and math.isnan(none.high)
    same = M.mean_ci([2.0, 2.0, np.inf, 2.0])  # no spread seen: no interval, where [2, 2] claimed the mean exact
    assert (same.mean, same.n, same.all_equal) == (2.0, 3, True) and math.isnan(same.low) and math.isnan(same.high)
    # equal but for rounding (CER steps of 1/5: 0.4 - 0.2 is not 0.6 - 0.4 in binary): no interval of width 1e-16
    rounded = M.paired_difference_ci([0.2, 0.4, 0.6] * 2, [0.4, 0.6, 0.8] * 2)
    assert rounded.all_equal and math.isnan(rounded.low) and rounded.mean == pytest.approx(-0.2)
    assert M.mean_ci([0.1] * 6).all_equal and not M.mean_ci([0.1, 0.1 + 1e-9]).all_equal
    # the tolerance is relative to the values, and 1e-12 of them (of 1 below 1): rounding, not a measured spread
    assert M.mean_ci([1e4, 1e4 + 1e-9]).all_equal and not M.mean_ci([1e4, 1e4 + 1e-6]).all_equal
    assert not M.mean_ci([0.5, 0.5 + 1.5e-12]).all_equal


@pytest.mark.parametrize("p, n", [(0.9, 6), (0.9, 8), (0.8, 6)])
def test_an_interval_stated_for_zero_one_scores_covers_the_truth(p, n):
    """Word accuracy on one-word prompts is 0 or 1 per pair: differences of 1 with probability p. Every interval
    stated must cover p 95% of the time; eight differences of 1 were stated as an exact [1, 1], and the stated
    intervals covered 46-75% (draws whose values were all equal: 26-53% of them)."""
    rng = np.random.default_rng([n, int(p * 10)])
    intervals = [M.mean_ci(x) for x in (rng.random((2000, n)) < p).astype(float)]
    stated = [ci for ci in intervals if not ci.all_equal]
    assert sum(ci.low <= p <= ci.high for ci in stated) / len(stated) >= 0.93
    assert all(math.isnan(ci.low) for ci in intervals if ci.all_equal)


def test_paired_difference_interval_uses_the_pairing():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 5, size=30)  # large between-item spread
    adapter = base + 0.5 + rng.normal(0, 0.1, size=30)  # small, consistent improvement
    diff = M.paired_difference_ci(adapter, base)
    assert diff.mean == pytest.approx(0.5, abs=0.1) and diff.low > 0
    # Unpaired, the two intervals overlap heavily and hide the improvement.
    assert M.mean_ci(adapter).low < M.mean_ci(base).high
    with pytest.raises(ValueError, match="not paired"):
        M.paired_difference_ci([1, 2], [1])
    # At the level asked (the verdict's 1 - 0.05/m): by hand, mean ± t(0.995, n - 1) * s / sqrt(n) at 99%.
    d = np.asarray(adapter) - np.asarray(base)
    half = stats.t.ppf(0.995, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    strict = M.paired_difference_ci(adapter, base, 0.99)
    assert (strict.low, strict.high) == pytest.approx((d.mean() - half, d.mean() + half))


@pytest.mark.parametrize("a, b, distance", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("abc", "ab", 1), ("ab", "abc", 1), ("abc", "", 3), ("", "abc", 3),
    ("abc", "abc", 0), ("abcdef", "azced", 3),
])  # fmt: skip
def test_edit_distance_is_levenshteins_both_ways(a, b, distance):
    assert M.edit_distance(a, b) == distance and M.edit_distance(b, a) == distance


def test_text_accuracy_caps_cer_at_one_and_scores_words_or_the_whole_text():
    assert M.text_accuracy("ab", "abcdefgh")["cer"] == 1.0  # 6 edits on 2 letters: capped, so means stay in [0, 1]
    half = M.text_accuracy("SUMMER SALE", "summer soil")
    assert half["word_accuracy"] == 0.5 and half["exact"] == 0.0
    # Words are found in order, no two sharing a read letter: "A" was found inside "DAY" (2 of 3 for one word read).
    assert M.text_accuracy("A NEW DAY", "DAY")["word_accuracy"] == pytest.approx(1 / 3)
    assert M.text_accuracy("I AM", "I AM")["word_accuracy"] == 1.0 and M.text_accuracy("SALE", "wholesale")["cer"] == 1
    assert M.text_accuracy("SALE SUMMER", "SUMMERSALE")["word_accuracy"] == 0.5  # out of order: one of them
    assert M.text_accuracy("GO GO GO", "GOGO")["word_accuracy"] == pytest.approx(2 / 3)  # each read letter once
    assert M.text_accuracy("SUMMER SALE SALE", "xsummerysalezsale")["word_accuracy"] == 1.0
    # No word characters to match word by word: the whole text either matches or not.
    assert M.text_accuracy("★ ★", "★★")["word_accuracy"] == 1.0 and M.text_accuracy("★ ★", "☆")["word_accuracy"] == 0.0
    with pytest.raises(ValueError, match="^text_accuracy: the expected text is empty$"):
        M.text_accuracy("  ", "SALE")


def test_the_interval_is_the_t_interval_of_the_mean_and_narrows_to_the_normal_one():
    """n = 400 normal values: mean ± t(0.975, 399) * s / sqrt(n), which is within 0.2% of 1.96 * s / sqrt(n)."""
    x = np.random.default_rng(7).normal(5.0, 2.0, 400)
    ci = M.mean_ci(x, 0.95)
    half_width = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert ci.mean == pytest.approx(x.mean())
    assert ci.high - ci.mean == pytest.approx(half_width, rel=0.005) and ci.mean - ci.low == pytest.approx(
        half_width, rel=0.005
    )
    assert M.mean_ci(x, 0.99).high > ci.high  # a higher confidence is a wider interval


def test_transparent_pixels_are_scored_as_composited_on_white():
    """The 2.1 VAE decodes RGBA: a metric must see what a viewer sees on a white page, not the hidden colour."""
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, at alpha 0, 128 and 255
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 0, 128, 255
    for picture in (rgba, Image.fromarray(rgba, "RGBA")):
        out = M.to_rgb_array(picture)
        assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
        assert out[0, 0].tolist() == [255, 255, 255] and out[1, 0].tolist() == [255, 0, 0]
        assert out[0, 1].tolist() == [255, 127, 127]
    grey_alpha = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")  # black, clear then opaque
    assert M.to_rgb_array(grey_alpha).tolist() == [[[255, 255, 255], [0, 0, 0]]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 0, 255, 0])
    palette.putdata([0, 1])
    palette.info["transparency"] = 0  # index 0 (blue) is transparent
    assert M.to_rgb_array(palette).tolist() == [[[255, 255, 255], [0, 255, 0]]]
    assert M.to_rgb_array(Image.new("L", (1, 1), 9)).tolist() == [[[9, 9, 9]]]
