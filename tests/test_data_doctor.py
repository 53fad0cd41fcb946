"""data doctor: every kind of broken input is reported by name; nothing crashes; user files are untouched."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from qwen_image_lora.cli import main
from qwen_image_lora.config import load_config
from qwen_image_lora.data.doctor import diagnose, probe_image
from qwen_image_lora.data.report import verdicts_dir
from qwen_image_lora.data.similarity import dhash, hamming, phase_correlation, phash
from qwen_image_lora.sample_data import BRAND_PALETTE, PRODUCTS, draw_product


def _photo(w, h, seed=0):
    """A smooth random 'photo' (structure at several scales, so hashes and correlations behave)."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def make_bad_folder(root):
    """A t2i folder with one of each problem; returns {file name: expected code}."""
    root.mkdir(parents=True, exist_ok=True)
    good = [_photo(160, 128, seed=i) for i in range(4)]
    for i, im in enumerate(good):
        im.save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"a qwnbrand product photo number {i}\nqwnbrand alternate caption {i}\n")
    (root / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    _photo(256, 256, seed=9).save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _photo(128, 128, seed=10).save(root / "renamed.jpg", format="PNG")  # a PNG named .jpg: decodes, warn only
    Image.new("RGB", (3000, 2000), "#884422").save(root / "huge.jpg", quality=50)
    _photo(24, 24, seed=11).save(root / "tiny.png")
    _photo(1000, 100, seed=12).save(root / "banner.png")
    rgba = _photo(128, 128, seed=13).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((128, 128)))
    rgba.save(root / "rgba.png")
    good[0].save(root / "copy_of_good0.png")  # exact duplicate, made later but listed first by name
    os.utime(root / "copy_of_good0.png", ns=(2 * 10**18, 2 * 10**18))
    os.utime(root / "good0.png", ns=(10**18, 10**18))
    _photo(128, 128, seed=14).save(root / "uncaptioned.png")
    (root / "blank.txt").write_text("\n  \n")
    _photo(128, 128, seed=15).save(root / "blank.png")
    _photo(128, 128, seed=16).save(root / "notrigger.png")
    (root / "notrigger.txt").write_text("a product photo without the word\n")
    (root / "long.txt").write_text("qwnbrand " + "product photo " * 700)
    _photo(128, 128, seed=18).save(root / "placeholder.png")
    (root / "placeholder.txt").write_text("a {trigger} bottle, qwnbrand label")
    _photo(128, 128, seed=17).save(root / "long.png")
    for name in ("empty", "truncated", "renamed", "huge", "tiny", "banner", "rgba", "copy_of_good0"):
        (root / f"{name}.txt").write_text(f"a qwnbrand {name} photo")
    return {
        "empty.jpg": "empty-file",
        "truncated.jpg": "truncated",
        "renamed.jpg": "extension-mismatch",
        "tiny.png": "too-small",
        "banner.png": "extreme-aspect",
        "uncaptioned.png": "missing-caption",
        "blank.png": "missing-caption",
        "notrigger.png": "missing-trigger",
        "long.png": "caption-too-long",
        "placeholder.png": "placeholder-in-caption",  # trained as "a {trigger} bottle", the braces and all
    }


def make_edit_pairs(root):
    """Consistent edits (grey studio -> coloured scene) plus one swapped, one shifted, one unrelated,
    one identical and one size-mismatched pair."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []

    def pair(i, shift=(0, 0), swap=False, unrelated=False, identical=False, other_size=False):
        base = np.full((128, 160, 3), 200, np.uint8)
        base[40:100, 50:110] = (30, 30, 30)  # the product
        base[60:70, 60:100] = (240, 240, 240)  # its label
        src = base.copy()
        tgt = base.copy()
        tgt[:40] = (30 + 20 * i, 120, 200)  # the edit: a coloured sky band and a green floor
        tgt[100:] = (40, 160, 60)
        if shift != (0, 0):
            src = np.roll(np.roll(src, shift[0], 0), shift[1], 1)
        s_img, t_img = Image.fromarray(src), Image.fromarray(tgt)
        if unrelated:
            s_img = _photo(160, 128, seed=100 + i)
        if identical:
            s_img = t_img
        if other_size:
            s_img = s_img.resize((200, 120))
        if swap:
            s_img, t_img = t_img, s_img
        s_img.save(root / f"p{i}_source.png")
        t_img.save(root / f"p{i}_target.png")
        rows.append(
            {
                "target": f"p{i}_target.png",
                "instruction": f"put the qwnbrand product in a park {i}",
                "sources": [f"p{i}_source.png"],
            }
        )

    for i in range(6):
        pair(i)
    pair(6, swap=True)
    pair(7, shift=(3, -2))
    pair(8, unrelated=True)
    pair(9, identical=True)
    pair(10, other_size=True)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


def _codes(report):
    out = {}
    for f in report.findings:
        out.setdefault(f.item, set()).add(f.code)
    return out


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "folder"
    return root, make_bad_folder(root)


def test_every_problem_in_a_folder_is_named(bad_folder, tiny_model_dir, tmp_path):
    root, expected = bad_folder
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    cfg = load_config(
        None,
        [
            f"data.path={root}",
            f"model.pretrained={tiny_model_dir}",
            "data.trigger_word=qwnbrand",
            "data.resolution=256",
            f"output_dir={tmp_path}",
        ],
    )
    report = diagnose(cfg)
    codes = _codes(report)
    for name, code in expected.items():
        assert code in codes.get(name, set()), (name, code, codes.get(name))
    for ok in ("good0.png", "good1.png", "huge.jpg", "rgba.png", "renamed.jpg"):
        assert ok not in report.excluded, (ok, report.excluded.get(ok))
    assert {
        "empty.jpg",
        "truncated.jpg",
        "tiny.png",
        "banner.png",
        "uncaptioned.png",
        "long.png",
        "copy_of_good0.png",
    } <= set(report.excluded)
    # an exact duplicate trains once: the later file (by modification time) is excluded, naming the one kept
    dup = [f for f in report.findings if f.code == "duplicate"]
    assert len(dup) == 1 and dup[0].item == "copy_of_good0.png"
    assert "same image as good0.png, which is kept (the earlier file)" in dup[0].message
    assert report.excluded["copy_of_good0.png"] == ["duplicate"]
    # a caption file that exists but is blank is named as such, not "add one"
    blank = next(f for f in report.findings if f.item == "blank.png" and f.code == "missing-caption")
    assert "blank.txt holds only blank lines" in blank.message and "add a" not in blank.message
    assert sum(report.buckets.values()) == report.n_clean
    text = report.table()
    assert "truncated" in text and "buckets" in text
    # Never edits or deletes the user's files.
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


def test_huge_over_the_limit_is_excluded(bad_folder, tiny_model_dir):
    root, _ = bad_folder
    cfg = load_config(None, [f"data.path={root}", f"model.pretrained={tiny_model_dir}", "data.max_megapixels=1.0"])
    assert "huge" in _codes(diagnose(cfg, tokenizer=None))["huge.jpg"]


def test_a_caption_file_named_a_little_off_is_named_in_the_hint(tmp_path, tiny_model_dir):
    """`Bottle.png` + `bottle.txt` (a case-blind disk's export) and `mug.png` + `mug.png.txt` were "no caption; add a
    Bottle.txt", never naming the file beside it; both images were left out."""
    for seed, name in enumerate(("Bottle.png", "mug.png", "can.png", "tin.png")):
        _photo(96, 96, seed=seed).save(tmp_path / name)
    (tmp_path / "bottle.txt").write_text("a bottle")
    (tmp_path / "mug.png.txt").write_text("a mug")
    (tmp_path / "tin.txt").write_bytes(b"")  # said to hold "only blank lines"
    cfg = load_config(None, [f"data.path={tmp_path}", f"model.pretrained={tiny_model_dir}"])
    hints = {f.item: f.message for f in diagnose(cfg, tokenizer=None).findings if f.code == "missing-caption"}
    assert hints == {
        "Bottle.png": "no caption; bottle.txt beside it is not its caption file: rename it Bottle.txt",
        "mug.png": "no caption; mug.png.txt beside it is not its caption file: rename it mug.txt",
        "can.png": "no caption; add a can.txt",
        "tin.png": "no caption; tin.txt is empty: write the caption in it",
    }
    # A manifest's row: a .txt beside its image is not read, so that fix did nothing.
    (tmp_path / "rows").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "rows" / "a.png")
    (tmp_path / "rows" / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": ""}) + "\n")
    (tmp_path / "rows" / "a.txt").write_text("a bottle")
    rows = load_config(None, [f"data.path={tmp_path / 'rows' / 'm.jsonl'}", f"model.pretrained={tiny_model_dir}"])
    found = [f.message for f in diagnose(rows, tokenizer=None).findings if f.code == "missing-caption"]
    assert found == ["no caption; write its 'caption' in the manifest"]
    (tmp_path / "bottle.txt").rename(tmp_path / "Bottle.txt")  # renamed as told: read, and the hint listing is new
    hints = {f.item for f in diagnose(cfg, tokenizer=None).findings if f.code == "missing-caption"}
    assert hints == {"mug.png", "can.png", "tin.png"}


def test_edit_pairs_swapped_shifted_unrelated_identical(tmp_path, tiny_model_dir):
    manifest = make_edit_pairs(tmp_path / "edits")
    cfg = load_config(
        None,
        [
            f"data.path={manifest}",
            f"model.pretrained={tiny_model_dir}",
            "data.trigger_word=qwnbrand",
            "data.resolution=128",
        ],
    )
    report = diagnose(cfg)
    codes = _codes(report)
    ids = {i: f"manifest.jsonl:{i + 1}" for i in range(11)}
    assert "swapped" in codes[ids[6]]
    assert "misaligned" in codes[ids[7]]
    shift = next(f.message for f in report.findings if f.item == ids[7] and f.code == "misaligned")
    assert "(-2, +3)" in shift  # (x, y): rolled 3 down and 2 left
    assert "unrelated-pair" in codes[ids[8]]
    assert "source-equals-target" in codes[ids[9]] and ids[9] in report.excluded
    assert "size-mismatch" in codes[ids[10]]
    for i in range(6):  # the clean pairs raise nothing (their targets differ only in the sky's colour)
        assert codes.get(ids[i], set()) <= {"near-duplicate"}, codes.get(ids[i])
    html_path = tmp_path / "sheet.html"
    report.write_html(html_path)
    html = html_path.read_text()
    assert html.count("data:image/") >= 2 * 11 - 1 and 'class="error"' in html and 'class="flag"' in html


def test_cli_strict_json_html(bad_folder, tiny_model_dir, tmp_path, capsys):

    root, _ = bad_folder
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        f"output_dir: {tmp_path}/out\nmodel: {{pretrained: {tiny_model_dir}}}\ndata: {{path: {root}, trigger_word: qwnbrand}}\n"
    )
    assert main(["data", "doctor", str(cfg_path), "--json", str(tmp_path / "r.json")]) == 0
    assert main(["data", "doctor", str(cfg_path), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "truncated.jpg" in out and "missing-caption" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["excluded"] >= 6 and "truncated.jpg" in data["excluded"]
    assert (verdicts_dir(load_config(cfg_path)) / "doctor.json").is_file()  # where prepare and training look
    manifest = make_edit_pairs(tmp_path / "edits")
    assert main(["data", "doctor", str(manifest), "--html", str(tmp_path / "pairs.html")]) == 0
    assert (tmp_path / "pairs.html").read_text().startswith("<!doctype html>")


def test_near_duplicates_see_colour(tmp_path, tiny_model_dir):
    """Colour variants of one product are distinct items; re-encoded, resized and cropped copies are not."""

    root = tmp_path / "catalog"
    root.mkdir()
    copies = set()
    for p, product in enumerate(PRODUCTS):
        for c, colour in enumerate(BRAND_PALETTE + ["#e07a5f"]):  # brand red vs coral: the closest pair tried
            draw_product(product, colour, "#e9d8a6", (256, 192)).save(root / f"{product}_{c}.png")
        original = draw_product(product, BRAND_PALETTE[0], "#e9d8a6", (256, 192))
        kind, copy = [
            ("jpeg", original),
            ("half", original.resize((128, 96))),
            ("crop", original.crop((6, 5, 250, 187))),
            ("jpeg", original.resize((200, 150))),
        ][p]
        copy.save(root / f"{product}_0_{kind}.jpg", quality=60)
        copies.add(f"{product}_0_{kind}.jpg")
    for f in root.glob("*.*"):
        f.with_suffix(".txt").write_text(f"a {f.stem} photo")
    cfg = load_config(None, [f"data.path={root}", f"model.pretrained={tiny_model_dir}", "data.resolution=128"])
    near = {f.item: f.message for f in diagnose(cfg, tokenizer=None).findings if f.code == "near-duplicate"}
    assert set(near) == copies, near
    for name, message in near.items():
        assert f"looks like {name.split('_0_')[0]}_0.png" in message


def test_bundled_sample_data_has_no_near_duplicates(sample_data_dir, tiny_model_dir):
    cfg = load_config(
        None,
        [
            f"data.path={sample_data_dir / 'manifest.jsonl'}",
            f"model.pretrained={tiny_model_dir}",
            "data.trigger_word=qwnbrand",
        ],
    )
    report = diagnose(cfg, tokenizer=None)
    assert report.n_items == 20 and not [f for f in report.findings if "duplicate" in f.code]


def test_repeated_findings_print_as_one_line(tmp_path, tiny_model_dir):
    root = tmp_path / "plain"
    root.mkdir()
    for i in range(7):
        _photo(128, 128, seed=i).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a product photo {i}")
    cfg = load_config(
        None,
        [
            f"data.path={root}",
            f"model.pretrained={tiny_model_dir}",
            "data.trigger_word=qwnbrand",
            "data.resolution=128",
        ],
    )
    report = diagnose(cfg, tokenizer=None)
    assert len([f for f in report.findings if f.code == "missing-trigger"]) == 7
    lines = [line for line in report.table().splitlines() if "missing-trigger" in line and line.startswith("warning")]
    assert len(lines) == 1 and "7 items" in lines[0] and "00.png, 01.png, 02.png" in lines[0]
    assert "missing-trigger 7" in report.summary()
    # Items of several captions each: the line counted findings as items ("7 items" of 4) and repeated examples.
    for i in range(7):
        (root / f"{i:02d}.txt").unlink() if i > 3 else (root / f"{i:02d}.txt").write_text("a mug\na cup\n")
        (root / f"{i:02d}.png").unlink() if i > 3 else None
    table = diagnose(cfg, tokenizer=None).table().splitlines()
    (line,) = [line for line in table if "missing-trigger" in line and line.startswith("warning")]
    assert "4 items" in line and "e.g. 00.png, 01.png, 02.png," in line


def test_hashes_and_phase_correlation():
    a, b = _photo(160, 128, 1), _photo(160, 128, 2)
    assert hamming(phash(a), phash(a.resize((80, 64)))) <= 4 and hamming(dhash(a), dhash(a.resize((80, 64)))) <= 6
    assert hamming(phash(a), phash(b)) > 12
    g = np.asarray(a.convert("L"), np.float32)
    dy, dx, peak, zero = phase_correlation(g, np.roll(np.roll(g, 5, 0), -4, 1))
    assert (dy, dx) == (5, -4) and peak > 0.3 > zero


def test_the_doctor_sees_a_16_bit_greyscale_image_as_its_tones_not_white(tmp_path):

    grey = (np.arange(96 * 64).reshape(96, 64) * 255 // (96 * 64 - 1)).astype(np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "i16.png")  # mode I;16
    info, image = probe_image(tmp_path / "i16.png", load_config(None, []))
    assert info.error is None and abs(np.asarray(image, float).mean() - grey.mean()) < 1  # was 255: clipped white


def test_a_gif_named_png_is_named_as_a_gif_with_what_trains_of_it(tmp_path, tiny_model_dir):
    """Issue #24: a GIF named .png trained silently. Like a PNG named .jpg it decodes, so it is kept, with a warning
    saying what it is (an animation trains its first frame only)."""
    frames = [_photo(128, 128, seed=i).convert("P") for i in range(3)]
    frames[0].save(tmp_path / "anim.png", format="GIF", save_all=True, append_images=frames[1:])
    _photo(128, 128, seed=5).save(tmp_path / "still.png", format="GIF")
    for name in ("anim", "still"):
        (tmp_path / f"{name}.txt").write_text(f"a {name} photo")
    report = diagnose(
        load_config(None, [f"data.path={tmp_path}", f"model.pretrained={tiny_model_dir}"]), tokenizer=None
    )
    found = {f.item: f.message for f in report.findings if f.code == "extension-mismatch"}
    assert found["anim.png"] == ("image anim.png: a GIF file named .png (not JPEG, PNG or WebP; 3 frames, only the first "
                                 "trains); it decodes, so it is kept")  # fmt: skip
    assert (
        found["still.png"]
        == "image still.png: a GIF file named .png (not JPEG, PNG or WebP); it decodes, so it is kept"
    )
    assert not report.excluded


def test_two_images_of_one_name_sharing_a_caption_file_are_named(tmp_path, tiny_model_dir):
    root = tmp_path / "folder"
    root.mkdir()
    _photo(128, 128, seed=1).save(root / "bottle.jpg")
    _photo(128, 128, seed=2).save(root / "bottle.png")
    (root / "bottle.txt").write_text("a qwnbrand bottle")
    _photo(128, 128, seed=3).save(root / "can.png")
    (root / "can.txt").write_text("a qwnbrand can")
    cfg = load_config(None, [f"data.path={root}", f"model.pretrained={tiny_model_dir}", f"output_dir={tmp_path / 'o'}"])
    shared = [f for f in diagnose(cfg, tokenizer=None).findings if f.code == "shared-caption"]
    assert [(f.severity, f.item) for f in shared] == [("warning", "bottle.png")]
    assert "takes its caption from bottle.txt, as bottle.jpg does" in shared[0].message
    # An exact copy is excluded as a duplicate: the caption it shares is no second warning (it landed on the original).
    (root / "bottle.jpg").write_bytes((root / "bottle.png").read_bytes())  # the same bytes (a PNG named .jpg)
    report = diagnose(cfg, tokenizer=None)
    assert [f.code for f in report.findings if f.item.startswith("bottle")].count("shared-caption") == 0
    assert any(f.code == "duplicate" for f in report.findings)
