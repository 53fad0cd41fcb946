"""Inputs beyond folders and JSONL: CSV manifests, Hugging Face datasets, EXIF orientation, alpha."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from qwen_image_lora.config import ConfigError, load_config
from qwen_image_lora.data.sources import DataError, load_items, open_image
from qwen_image_lora.knobs import MAX_INPUT_IMAGES


def test_csv_manifest_with_several_captions_and_edit_rows(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), "red").save(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text(
        "image,caption,target,instruction,sources\na.png,first || second,,,\n,,c.png,make it blue,a.png|b.png\n"
    )
    t2i, edit = load_items(load_config(None, [f"data.path={tmp_path / 'm.csv'}"]).data)
    assert t2i.captions == ("first", "second") and t2i.kind == "t2i"
    assert (
        edit.kind == "edit"
        and [p.name for p in edit.sources] == ["a.png", "b.png"]
        and edit.captions == ("make it blue",)
    )
    # A quoted cell over two lines, a blank line, then a bad row: it was named by its row count (line 3, not 6).
    (tmp_path / "m.csv").write_text(
        'image,caption,target,instruction,sources\n,,c.png,"make it\nblue",a.png\n\n  ,  \n,,c.png,make it red,\n'
    )  # a blank line and one of spaces (an editor's) are no rows
    with pytest.raises(DataError, match=rf"^{tmp_path / 'm.csv'}:6: edit rows need target, instruction and sources"):
        load_items(load_config(None, [f"data.path={tmp_path / 'm.csv'}"]).data)


def test_a_csv_row_cut_at_an_unquoted_comma_or_a_column_given_twice_is_refused_naming_the_line(tmp_path):
    """`a.png,a can, red, on white` trained as "a can" (the rest dropped), and `caption,caption` kept the last column;
    the doctor called both clean."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text('image,caption\na.png,"a can, red"\na.png,a can, red, on white\n')
    with pytest.raises(DataError, match=rf"^{manifest}:3: 4 cells for 2 columns; put a cell that holds a comma in "
                                        r'double quotes \("a can, red"\)$'):  # fmt: skip
        load_items(load_config(None, [f"data.path={manifest}"]).data)
    manifest.write_text("image,caption,caption\na.png,one,two\n")
    with pytest.raises(DataError, match=rf"^{manifest}:1: column 'caption' is given twice"):
        load_items(load_config(None, [f"data.path={manifest}"]).data)
    manifest.write_text('image,caption,\na.png,"a can, red",\n')  # a trailing comma (an empty column) is no cut
    assert load_items(load_config(None, [f"data.path={manifest}"]).data)[0].captions == ("a can, red",)


def test_a_line_separator_inside_a_caption_is_part_of_it(tmp_path):
    """str.splitlines() split at U+2028 and U+0085 (a mis-decoded "..."): a JSONL row holding one was "not valid
    JSON", and a .txt caption became two captions."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    caption = "a qwnbrand can\u2028on white\x85"
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": caption}, ensure_ascii=False) + "\r\n")
    (item,) = load_items(load_config(None, [f"data.path={tmp_path / 'm.jsonl'}"]).data)
    assert item.captions == (caption,)
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("first\u2028half\r\nsecond\rthird\n", encoding="utf-8")
    (item,) = load_items(load_config(None, [f"data.path={folder}"]).data)
    assert item.captions == ("first\u2028half", "second", "third")


def test_a_byte_order_mark_from_excel_or_notepad_is_no_part_of_a_key_or_caption(tmp_path):
    """Excel's CSV was refused ("unknown key '\\ufeffimage'") and Notepad's caption trained with an invisible mark."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("\ufeffimage,caption\na.png,a red mug\n", encoding="utf-8")
    (item,) = load_items(load_config(None, [f"data.path={tmp_path / 'm.csv'}"]).data)
    assert item.captions == ("a red mug",)
    (tmp_path / "a.txt").write_text("\ufeffqwnbrand mug", encoding="utf-8")
    (item,) = load_items(load_config(None, [f"data.path={tmp_path}"]).data)
    assert item.captions == ("qwnbrand mug",)


def test_hf_dataset_from_disk_with_column_mapping(tmp_path):

    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    ds = datasets.Dataset.from_dict({"img": [str(tmp_path / f"{i}.png") for i in range(3)], "text": ["x", "y", ""]})
    ds.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    cfg = load_config(
        None,
        [
            f"data.path={tmp_path / 'hf'}",
            "data.columns={image: img, caption: text}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    items = load_items(cfg.data)
    assert [i.captions for i in items] == [("x",), ("y",), ()]
    assert all(i.target.is_file() for i in items)  # embedded bytes become plain files under the cache
    assert np.asarray(Image.open(items[1].target))[0, 0, 0] == 80
    # With no data cache (null) the files went into the user's dataset folder ("your files are never modified").
    before = sorted((tmp_path / "hf").rglob("*"))
    nocache = load_config(None, [f"data.path={tmp_path / 'hf'}", "data.columns={image: img, caption: text}",
                                 "data.cache_dir=null"])  # fmt: skip
    assert all(i.target.is_file() for i in load_items(nocache.data)) and sorted((tmp_path / "hf").rglob("*")) == before
    # The caption column under another name, unmapped: every item was "missing-caption: add a <cache hash>.txt".
    cfg = load_config(None, [f"data.path={tmp_path / 'hf'}", "data.columns={image: img}"])
    with pytest.raises(
        DataError, match=r"no 'caption' column \(columns: img, text\); map yours with data.columns.caption="
    ):
        load_items(cfg.data)


def test_an_hf_datasets_own_image_bytes_win_over_a_file_of_its_name_in_the_working_folder(tmp_path, monkeypatch):
    """The cell's stored file name was tried first against the working folder: a `1.png` there trained instead."""
    for i in range(2):
        Image.new("RGB", (64, 64), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / f"{i}.png") for i in range(2)], "caption": ["x", "y"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 96), "white").save(elsewhere / f"{i}.png")
        (tmp_path / f"{i}.png").unlink()  # only the data set's bytes are left
    monkeypatch.chdir(elsewhere)
    cfg = load_config(None, [f"data.path={tmp_path / 'hf'}", f"data.cache_dir={tmp_path / 'cache'}"])
    items = load_items(cfg.data)
    assert [Image.open(i.target).size for i in items] == [(64, 64), (64, 64)]
    assert np.asarray(Image.open(items[1].target))[0, 0, 0] == 80 and elsewhere not in items[1].target.parents


def test_exif_orientation_and_alpha(tmp_path):
    im = Image.new("RGB", (80, 40), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (40, 80)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    assert open_image(tmp_path / "a.png", "composite", "#00ff00").getpixel((0, 0)) == (0, 255, 0)
    assert open_image(tmp_path / "a.png", "keep").mode == "RGBA"


def _grey_ramp(h=24, w=32) -> np.ndarray:
    """An 8-bit greyscale ramp (mean ~128, not white) for the high-bit-depth copies below."""
    return (np.arange(h * w).reshape(h, w) * 255 // (h * w - 1)).astype(np.uint8)


def test_high_bit_depth_images_are_scaled_to_8_bits_not_clipped_white(tmp_path):
    grey = _grey_ramp()
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "i16.png")  # a 16-bit greyscale PNG (mode I;16)
    Image.fromarray(grey.astype(np.int32) * 257).save(tmp_path / "i32.tif")  # mode I, the same 16-bit range
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "f32.tif")  # mode F, floats in [0, 1]
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    for name in ("i16.png", "i32.tif", "f32.tif"):
        got = np.asarray(open_image(tmp_path / name))
        assert got.shape == (*grey.shape, 3), name
        assert np.abs(got[..., 0].astype(int) - grey).max() <= 1, name  # was 255 everywhere but black


def test_an_edit_row_takes_1_to_10_references_by_the_one_rule(tmp_path):

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    for count in (0, MAX_INPUT_IMAGES + 1):
        row = {"target": "a.png", "instruction": "x", "sources": ["a.png"] * count}
        (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=rf"m.jsonl:1: sources: give 1 to 10 input images \(got {count}\)"):
            load_items(load_config(None, [f"data.path={tmp_path / 'm.jsonl'}"]).data)
    row["sources"] = ["a.png"] * MAX_INPUT_IMAGES
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    assert len(load_items(load_config(None, [f"data.path={tmp_path / 'm.jsonl'}"]).data)[0].sources) == 10


def test_a_key_one_typo_from_ours_is_refused_and_the_users_own_columns_are_not(tmp_path):
    """`captoin` was read as no caption at all: `validate` said OK and the run trained uncaptioned."""
    manifest = tmp_path / "m.jsonl"

    def load(row):
        manifest.write_text(json.dumps(row) + "\n")
        return load_items(load_config(None, [f"data.path={manifest}"]).data)

    with pytest.raises(DataError, match=rf"^{manifest}:1: unknown key 'captoin'; did you mean 'caption'\?$"):
        load({"image": "a.png", "captoin": "qwnbrand"})
    (edit,) = load({"target": "t.png", "instruction": "x", "sources": ["s.png"], "source": "studio"})  # ours is there
    assert [p.name for p in edit.sources] == ["s.png"]
    with pytest.raises(DataError, match=r":1: unknown key 'source'; did you mean 'sources'\?$"):
        load({"target": "t.png", "instruction": "x", "source": "s.png"})
    (item,) = load({"image": "a.png", "caption": "qwnbrand", "sku": "B-12", "notes": "matte"})
    assert item.captions == ("qwnbrand",)
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text("image,capton\na.png,qwnbrand\n")
    with pytest.raises(DataError, match=rf"^{csv_manifest}:2: unknown key 'capton'; did you mean 'caption'\?$"):
        load_items(load_config(None, [f"data.path={csv_manifest}"]).data)


def test_a_manifest_path_that_is_not_a_string_is_refused_naming_line_and_key(tmp_path):
    """`{"image": 5}` (or null, a list, `"sources": [3]`) was `TypeError: unsupported operand type(s) for /` in
    validate, the doctor, prepare and the trainer."""
    manifest = tmp_path / "m.jsonl"
    for row, key, got in (
        ({"image": 5, "caption": "qwnbrand"}, "image", "5"),
        ({"image": None, "caption": "qwnbrand"}, "image", "null"),
        ({"image": ["a.png"], "caption": "qwnbrand"}, "image", '["a.png"]'),
        ({"target": "t.png", "instruction": "x", "sources": [3]}, "sources", "3"),
        ({"target": "", "instruction": "x", "sources": ["s.png"]}, "target", '""'),
        ({"target": "t.png", "instruction": "x", "sources": ["s.png"], "mask": 1}, "mask", "1"),
    ):
        manifest.write_text(json.dumps({"image": "ok.png", "caption": "fine"}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError) as refused:
            load_items(load_config(None, [f"data.path={manifest}"]).data)
        assert str(refused.value) == f"{manifest}:2: {key!r} must be a file path (a string), got {got}"
        assert refused.value.field == key


def test_a_folder_leaves_out_hidden_files_and_folders_and_a_run_folder_inside_it(tmp_path):
    """`.ipynb_checkpoints/` and `.trash/` copies trained, and an output_dir under data.path fed each run's previews
    to the next."""
    for name in ("a.png", "sub/b.png", ".ipynb_checkpoints/a-checkpoint.png", ".trash/old.png", "._a.png",
                 "run/samples/step_000005/t2i_00.png", "sub/run2/pytorch_lora_weights.png"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64)).save(tmp_path / name, format="PNG")
        (tmp_path / name).with_suffix(".txt").write_text("qwnbrand\n")
    (tmp_path / "run" / "run.json").write_text('{"run_id": "abc"}')
    (tmp_path / "sub" / "run2" / "run.json").write_text('{"run_id": "def"}')
    items = load_items(load_config(None, [f"data.path={tmp_path}"]).data)
    assert [item.id for item in items] == ["a.png", "sub/b.png"]
    # The run folder being data.path itself: refused at load (its previews at samples/ trained the next run).
    with pytest.raises(ConfigError, match=rf"^on the command line, output_dir={tmp_path}: output_dir: {tmp_path} is "
                                          "data.path itself"):  # fmt: skip
        load_config(None, [f"data.path={tmp_path}", f"output_dir={tmp_path}"])


def test_a_linked_subfolder_is_read_and_a_link_back_up_read_once(tmp_path):
    """Linked files were read and linked folders left out without a word ("subfolders are read")."""
    elsewhere, data = tmp_path / "more", tmp_path / "data"
    for name in (elsewhere / "c.png", data / "a.png"):
        name.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 64)).save(name)
        name.with_suffix(".txt").write_text("qwnbrand\n")
    (data / "more").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(data, target_is_directory=True)  # a loop
    items = load_items(load_config(None, [f"data.path={data}"]).data)
    assert [item.id for item in items] == ["a.png", "more/c.png"]
