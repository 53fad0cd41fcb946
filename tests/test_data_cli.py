"""`qwen-lora data doctor | prepare` say plainly what they did (and did not) write."""

from __future__ import annotations

from pathlib import Path

from qwen_image_lora.cli import main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_doctor_html_on_a_set_without_edit_pairs_says_it_wrote_nothing(sample_data_dir, tmp_path, capsys):
    sheet = tmp_path / "pairs.html"
    assert (
        main(
            [
                "data",
                "doctor",
                str(sample_data_dir / "brand"),
                "--html",
                str(sheet),
                f"model.pretrained={tmp_path / 'no-model'}",
            ]
        )
        == 0
    )
    assert f"--html {sheet}: not written: the contact sheet shows edit pairs, and this data set has none" in (
        capsys.readouterr().out
    )
    assert not sheet.exists()


def test_prepare_in_one_process_reports_without_rank_brackets(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "prepare",
                "--config",
                str(DEMO),
                f"model.pretrained={tiny_model_dir}",
                f"data.path={sample_data_dir / 'brand'}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.resolution=64",
            ]
        )
        == 0
    )
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prepare")]
    assert line.startswith("prepare: ") and " items, 0 already cached, " in line and "[" not in line


def test_doctor_json_or_html_naming_a_folder_is_one_error_line_before_the_data_is_read(tmp_path, capsys):
    """`--json DIR` ended in an IsADirectoryError traceback after the whole data set had been read."""
    folder = tmp_path / "reports"
    folder.mkdir()
    for option, name in (("--json", "doctor.json"), ("--html", "edit_pairs.html")):
        # The data path does not exist: an error naming the option proves it was checked first.
        assert main(["data", "doctor", str(tmp_path / "no-data"), option, str(folder)]) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("note:")]
        assert line == f"error: {option} {folder}: is a folder; give a file path, e.g. {folder / name}"
    assert list(folder.iterdir()) == []


def test_doctor_takes_its_config_as_prepare_does_and_says_what_to_give(sample_data_dir, tmp_path, capsys):
    """`data doctor` alone said "required: target, overrides" (overrides are optional), and `--config CFG` (as
    prepare and caption take it) was "unrecognized arguments"."""
    assert main(["data", "doctor"]) == 2
    assert capsys.readouterr().err == (
        "error: data doctor: give a config (.yaml) or a data folder / manifest, e.g. "
        "`qwen-lora data doctor configs/brand.yaml`\n"
    )
    overrides = [f"data.path={sample_data_dir / 'brand'}", f"model.pretrained={tmp_path / 'no-model'}"]
    tables = []
    for argv in ([str(DEMO), *overrides], ["--config", str(DEMO), *overrides]):
        assert main(["data", "doctor", *argv, "--json", str(tmp_path / "d.json")]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "12" in tables[0]
