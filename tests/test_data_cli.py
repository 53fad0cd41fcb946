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
