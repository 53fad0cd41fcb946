"""Evaluation metrics against published reference values: CIEDE2000 on Sharma, Wu & Dalal's test pairs, CIELAB
of the sRGB primaries, and SSIM / PSNR on small images whose answers are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from qwen_image_lora.eval import metrics as M

# G. Sharma, W. Wu, E. N. Dalal, "The CIEDE2000 Color-Difference Formula: Implementation Notes, Supplementary
# Test Data, and Mathematical Observations", Color Research & Application 30(1), 2005, Table 1: the 34 pairs
# (L1, a1, b1, L2, a2, b2, dE00). Transcribed via scikit-image's copy of the table
# (skimage/color/tests/ciede2000_test_data.txt). Pairs 7-16 straddle the hue-angle discontinuities.
SHARMA_2005 = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]

# CIELAB (D65, 2 degree observer) of sRGB colours, as published by B. Lindbloom's colour calculator.
KNOWN_LAB = {
    "#ffffff": (100.0, 0.0, 0.0),
    "#000000": (0.0, 0.0, 0.0),
    "#ff0000": (53.2408, 80.0925, 67.2032),
    "#00ff00": (87.7347, -86.1827, 83.1793),
    "#0000ff": (32.2970, 79.1875, -107.8602),
}


@pytest.mark.parametrize("pair", range(1, len(SHARMA_2005) + 1))
def test_ciede2000_matches_sharma_table(pair):
    *lab, expected = SHARMA_2005[pair - 1]
    lab1, lab2 = np.array([lab[:3]]), np.array([lab[3:]])
    assert M.nearest_palette_distance(lab1, lab2)[0] == pytest.approx(expected, abs=5e-5)
    assert M.nearest_palette_distance(lab2, lab1)[0] == pytest.approx(expected, abs=5e-5)  # symmetric


def test_nearest_palette_distance_takes_the_nearest_colour():
    lab1 = np.array([row[:3] for row in SHARMA_2005[16:20]])  # the same colour, four partners
    partners = np.array([row[3:6] for row in SHARMA_2005[16:20]])
    assert M.nearest_palette_distance(lab1, partners) == pytest.approx([19.4535] * 4, abs=5e-5)


def test_lab_of_known_srgb_colours():
    got = M.hex_to_lab(list(KNOWN_LAB))
    np.testing.assert_allclose(got, np.array(list(KNOWN_LAB.values())), atol=0.01)
    flat_red = np.full((16, 16, 3), (255, 0, 0), np.uint8)
    centres, shares = M.dominant_colours(flat_red)
    np.testing.assert_allclose(centres, [KNOWN_LAB["#ff0000"]], atol=0.01)
    assert shares.tolist() == [1.0]


def test_palette_verdict_on_a_near_miss_is_taken_in_lab():
    # For this grey-green, #697872 is nearer in RGB (also by CIEDE2000 misapplied to RGB triples) but #5d7d66 is
    # nearer in CIELAB, by 3.19 against 6.96 dE00.
    image = np.full((32, 32, 3), (0x68, 0x7F, 0x6B), np.uint8)
    palette = ["#697872", "#5d7d66"]
    lab = M.hex_to_lab(["#687f6b", *palette])
    per_colour = [M.nearest_palette_distance(lab[:1], lab[i : i + 1])[0] for i in (1, 2)]
    assert per_colour == pytest.approx([6.9615, 3.1876], abs=1e-3)
    assert M.palette_distance(image, palette) == pytest.approx(per_colour[1], abs=1e-6)
    assert M.palette_distance(image, palette[:1]) == pytest.approx(per_colour[0], abs=1e-6)


def _stripes(widths, colours, height=32) -> np.ndarray:
    return np.concatenate([np.full((height, w, 3), c, np.uint8) for w, c in zip(widths, colours)], axis=1)


SIX = [(227, 6, 19), (255, 255, 255), (0, 0, 0), (0, 90, 200), (250, 200, 0), (0, 150, 60)]


def test_dominant_colours_defaults_and_downsampling():
    six = _stripes([40, 30, 20, 16, 12, 10], SIX)  # 128 px wide: downsampled to 64 by 2x2 boxes
    centres, shares = M.dominant_colours(six)
    explicit = M.dominant_colours(six, k=5, seed=0, side=64)
    assert len(centres) == 5 and np.array_equal(centres, explicit[0]) and np.array_equal(shares, explicit[1])
    assert np.all(np.diff(shares) <= 0)  # largest share first
    halves = _stripes([64, 64], [(227, 6, 19), (255, 255, 255)], height=128)
    centres, shares = M.dominant_colours(halves, k=2)  # box-averaging 2x2 blocks never blends the halves
    assert shares.tolist() == [0.5, 0.5]
    np.testing.assert_allclose(np.sort(centres[:, 0]), np.sort(M.hex_to_lab(["#e30613", "#ffffff"])[:, 0]), atol=1e-9)


def test_palette_distance_defaults_and_errors():
    six = _stripes([40, 30, 20, 16, 12, 10], SIX)
    palette = ["#e30613", "#ffffff"]
    assert M.palette_distance(six, palette) == M.palette_distance(six, palette, k=5, seed=0)
    assert M.palette_distance(six, palette, k=2) != M.palette_distance(six, palette)
    assert M.hex_to_lab(["ff0000"]) == pytest.approx(np.array([KNOWN_LAB["#ff0000"]]), abs=0.01)  # '#' optional
    with pytest.raises(ValueError, match="palette_distance: the palette is empty; set eval.palette to hex colours"):
        M.palette_distance(six, [])


# ----------------------------------------------------------------------------------------- SSIM / PSNR


def _luminance_ssim(mu_a: float, mu_b: float) -> float:
    """SSIM of two flat patches (no variance, so only the luminance term is left), with skimage's C1."""
    c1 = (0.01 * 255) ** 2
    return (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)


def test_ssim_and_psnr_of_flat_images_by_hand():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[..., 0] = 110  # one channel off by 10
    got = M.preservation(a, b)
    # (22006.5025 / 22106.5025 + 1 + 1) / 3; MSE = 10^2 / 3 -> 10 log10(255^2 * 3 / 100)
    assert got["ssim"] == pytest.approx((_luminance_ssim(100, 110) + 2) / 3, abs=1e-9)
    assert got["ssim"] == pytest.approx(0.998492, abs=1e-6)
    assert got["psnr"] == pytest.approx(10 * math.log10(255**2 * 3 / 100), abs=1e-9)
    assert got["psnr"] == pytest.approx(32.9020, abs=1e-4)


def test_masked_ssim_and_psnr_by_hand():
    a = np.full((32, 32, 3), 100, np.uint8)
    b = a.copy()
    b[:, :8] = 200  # the edited strip, masked out
    b[:, 8:, 0] = 110  # everything else: one channel off by 10
    mask = np.zeros((32, 32), bool)
    mask[:, :8] = True
    got = M.preservation(a, b, mask)
    # PSNR over the 24 kept columns, MSE = 10^2 / 3. SSIM only 3 px (half a 7x7 window) or more from the edit,
    # so no window there sees the strip and every one is flat: the luminance term of 100 against 110.
    assert got["psnr"] == pytest.approx(10 * math.log10(255**2 * 3 / 100), abs=1e-9)
    assert got["ssim"] == pytest.approx((_luminance_ssim(100, 110) + 2) / 3, abs=1e-9)
    unmasked = M.preservation(a, b)
    assert unmasked["ssim"] < got["ssim"] - 0.05 and unmasked["psnr"] < got["psnr"] - 10


# ----------------------------------------------------------------------------------------- k-means, intervals


def test_kmeans_finds_well_separated_clusters_and_their_means():
    rng = np.random.default_rng(0)
    groups = [np.array(c) + rng.normal(0, 1, (n, 3)) for c, n in [((0, 0, 0), 50), ((60, 0, 0), 30), ((0, 60, 0), 20)]]
    points = np.concatenate(groups)
    centres, labels = M._kmeans(points, 3, seed=0)
    for i, group in enumerate(groups):
        ids = labels[sum(len(g) for g in groups[:i]) :][: len(group)]
        assert len(set(ids)) == 1  # a group is one cluster
        np.testing.assert_allclose(centres[ids[0]], group.mean(0), atol=1e-9)
    assert len(set(labels)) == 3
    again = M._kmeans(points, 3, seed=0)
    assert np.array_equal(again[0], centres) and np.array_equal(again[1], labels)
    two = np.array([[0.0, 0, 0]] * 5 + [[50.0, 0, 0]] * 3)
    centres, labels = M._kmeans(two, 5, seed=0)  # only two distinct colours: two clusters, not five
    assert sorted(centres[:, 0].tolist()) == [0.0, 50.0] and np.bincount(labels).tolist() in ([5, 3], [3, 5])


def test_interval_known_answers():
    # [0, 10]: mean 5, sem 5, t(0.975, df=1) = 12.7062.
    ci = M.mean_ci([0.0, 10.0])
    assert (ci.mean, ci.n) == (5.0, 2) and (ci.low, ci.high) == pytest.approx((5 - 63.531, 5 + 63.531), abs=1e-3)
    x = np.random.default_rng(3).normal(size=30)
    assert M.paired_difference_ci(x, x[::-1]) == M.mean_ci(x - x[::-1])


def test_preservation_mask_forms_and_errors():
    a = np.full((32, 32, 3), 100, np.uint8)
    b = a.copy()
    b[:, :8] = 200
    by_hand = M.preservation(a, b, np.pad(np.ones((32, 8), bool), ((0, 0), (0, 24))))
    rgb_mask = np.zeros((32, 32, 3), np.uint8)
    rgb_mask[:, :8, 1] = 1  # any non-zero channel marks the pixel
    assert M.preservation(a, b, rgb_mask) == by_hand
    grey = np.zeros((32, 32), np.uint8)
    grey[:, :8] = 128  # an image mask counts above half grey, and 127 is not above it
    grey[:, 8:] = 127
    assert M.preservation(a, b, Image.fromarray(grey)) == by_hand
    with pytest.raises(ValueError, match="preservation: mask is 16x32, images are 32x32"):
        M.preservation(a, b, np.zeros((32, 16), bool))
    with pytest.raises(ValueError, match="preservation: images must have the same size, got 32x32 and 16x32"):
        M.preservation(a, b[:, :16])
