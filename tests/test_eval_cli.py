"""`qwen-lora eval` end to end on the tiny model: base vs adapters at the same seeds, and checkpoint ranking."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from qwen_image_lora.cli import main
from qwen_image_lora.config import load_config, save_config
from qwen_image_lora.data.dataset import build_training_data
from qwen_image_lora.eval.cli import _report_in_the_evaluated_run
from qwen_image_lora.eval.evaluator import _adapter_names, check_run_config, evaluate, find_checkpoints


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, make_adapter, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "noop": make_adapter(tiny_model_dir, root / "noop", 0.0),
        "noisy": make_adapter(tiny_model_dir, root / "noisy", 0.5),
    }


@pytest.fixture
def config_path(tmp_path, tiny_model_dir, sample_data_dir) -> Path:
    edits = sample_data_dir / "edits"
    row = json.loads((edits / "manifest.jsonl").read_text().splitlines()[0])
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"pretrained": str(tiny_model_dir), "dtype": "float32"},
        "data": {"path": str(sample_data_dir / "brand"), "resolution": 64},
        "validation": {"held_out_fraction": 0.3},
        "eval": {
            "prompts": ['a qwnbrand mug with a label that says "QWN"'],
            "edits": [{"images": [str(edits / row["sources"][0])], "prompt": row["instruction"]}],
            "seeds": [0, 1],
            "palette": ["#d7263d", "#1b998b", "#f4d35e"],
            "num_inference_steps": 2,
        },
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_folder(run: Path, adapters, cfg) -> Path:
    """The layout train/lora.py writes: checkpoints/step-N/adapter, then the final adapter, metadata and config."""
    for step, name in ((10, "noop"), (20, "noisy")):
        shutil.copytree(adapters[name], run / "checkpoints" / f"step-{step:06d}" / "adapter")
    shutil.copy(adapters["noisy"] / "pytorch_lora_weights.safetensors", run)
    (run / "training_metadata.json").write_text(json.dumps({"steps": 30}))
    save_config(cfg, run / "config.yaml")
    return run


def test_eval_cli_compares_adapters_and_ranks_checkpoints(config_path, adapters, tmp_path, capsys, caplog):
    run = _run_folder(tmp_path / "run", adapters, load_config(config_path))
    argv = [
        "eval",
        "--config",
        str(config_path),
        "--adapter",
        str(adapters["noop"]),
        "--adapter",
        str(adapters["noisy"]),
        "--checkpoints",
        str(run),
        "--output",
        str(tmp_path / "report"),
        "eval.guidance_scale=4",  # no negative prompt: a note in the report, not a warning per image
    ]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "guidance" not in caplog.text
    assert "eval.guidance_scale acts only with a negative_prompt" in data["notes"][0]
    # The summary opens with one verdict line per adapter; a no-op adapter is no different from base.
    assert out[:2] == [data["verdicts"]["noop"]["line"], data["verdicts"]["noisy"]["line"]]
    assert out[0].startswith("noop: too few samples for palette distance (n=4), ")  # 2 seeds: no verdict yet
    assert out[0].endswith("not measured: CLIPScore (eval.clip_model is not set)")
    assert out[-1].startswith("numbers: ")

    assert data["variants"] == ["base", "noop", "noisy"]
    assert [(s["kind"], s["seed"]) for s in data["samples"]] == [("t2i", 0), ("t2i", 1), ("edit", 0), ("edit", 1)]
    t2i, edit = data["samples"][0]["metrics"], data["samples"][2]["metrics"]
    assert {"palette_delta_e", "text_cer", "text_word_accuracy"} <= set(t2i["base"])
    assert {"ssim", "psnr", "shift_px", "scale_error", "palette_delta_e"} <= set(edit["base"])
    # Same seeds through the same sampling path: a no-op adapter reproduces base exactly, a real one does not.
    assert all(s["metrics"]["noop"] == s["metrics"]["base"] for s in data["samples"])
    assert data["metrics"]["palette_delta_e"]["delta"]["noop"]["mean"] == 0
    assert any(s["metrics"]["noisy"] != s["metrics"]["base"] for s in data["samples"])
    assert any("CLIPScore and reference similarity skipped" in n for n in data["notes"])

    losses = {c["name"]: c["loss"] for c in data["checkpoints"]}
    assert set(losses) == {"base", "step-000010", "step-000020", "final"}
    # 5 held-out items: a "best" named on them alone read as settled (image verdicts wait for 6 pairs)
    assert ("Checkpoints are ranked on 5 held-out items (one loss each, no interval): close losses may swap on other "
            "items.") in data["notes"]  # fmt: skip
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["step-000010"] != losses["step-000020"] == losses["final"]  # final = the noisy adapter here
    assert losses["step-000010"] == losses["base"]  # the no-op adapter: the base model's loss exactly
    assert next(c["step"] for c in data["checkpoints"] if c["name"] == "final") == 30
    trained = min((n for n in losses if n != "base"), key=losses.get)
    best = trained if losses[trained] < losses["base"] else None  # a "best" that is no better than base is none
    assert data["best_checkpoint"] == best and out[-3] == data["checkpoint_verdict"]
    assert (tmp_path / "report" / "report.html").read_text().count("data:image/jpeg") == 4 * 3 + 2


def test_evaluate_leaves_the_pipeline_as_found(config_path, adapters, tiny_pipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN_LORA_PROGRESS_SECONDS", "0")  # captured stderr is not a terminal: progress lines
    cfg = load_config(config_path, [f"eval.output_dir={tmp_path / 'out'}", "eval.seeds=[0]", "eval.prompts=[]"])
    _, json_path = evaluate(cfg, [adapters["noisy"]], pipe=tiny_pipe)
    assert [line.split()[3] for line in capsys.readouterr().err.splitlines() if " eval images " in line] == [
        "1/2",
        "2/2",
    ]
    assert not getattr(tiny_pipe.transformer, "peft_config", None)
    data = json.loads(json_path.read_text())
    assert data["variants"] == ["base", "noisy"] and len(data["samples"]) == 1
    assert any("Text accuracy skipped" in n for n in data["notes"])


def test_a_checkpoints_adapter_goes_by_its_step_and_the_report_names_each_file(config_path, adapters, tiny_pipe,
                                                                               tmp_path):  # fmt: skip
    """Two of a run's checkpoints were "adapter" and "adapter-2", and no report said which file either was."""
    run = _run_folder(tmp_path / "run", adapters, load_config(config_path))
    given = [run / "checkpoints" / "step-000010" / "adapter",
             run / "checkpoints" / "step-000020" / "adapter" / "pytorch_lora_weights.safetensors"]  # fmt: skip
    cfg = load_config(config_path, [f"eval.output_dir={tmp_path / 'out'}", "eval.seeds=[0]", "eval.edits=[]"])
    html_path, json_path = evaluate(cfg, given, pipe=tiny_pipe)
    data = json.loads(json_path.read_text())
    assert data["variants"] == ["base", "step-000010", "step-000020"]
    weights = [given[0] / "pytorch_lora_weights.safetensors", given[1]]
    assert data["adapters"] == {
        f"step-0000{step}0": {"source": str(path), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
        for step, path, file in zip((1, 2), given, weights, strict=True)
    }
    assert f"step-000020: {given[1]} (sha256 {data['adapters']['step-000020']['sha256'][:12]})" in html_path.read_text()


def test_eval_says_when_it_falls_back_on_the_validation_prompts_before_rendering(config_path, tiny_pipe, tmp_path,
                                                                                  caplog):  # fmt: skip
    """It said so in the report alone, after every image had rendered."""
    cfg = load_config(config_path, [f"eval.output_dir={tmp_path / 'out'}", "eval.prompts=[]", "eval.edits=[]",
                                    "eval.seeds=[0]", "validation.prompts=[a mug]", "validation.edits=[]"])  # fmt: skip
    said = "eval.prompts and eval.edits are empty; used validation.prompts and validation.edits."
    with caplog.at_level(logging.INFO, "qwen_image_lora"):
        _, json_path = evaluate(cfg, [], pipe=tiny_pipe)
    messages = [r.getMessage() for r in caplog.records]
    assert said in json.loads(json_path.read_text())["notes"]
    assert messages.index(said) < next(i for i, m in enumerate(messages) if m.startswith("rendered "))


def test_eval_cli_errors_name_the_problem(config_path, unloadable_model, tmp_path, capsys):
    assert main(["eval", "--config", str(config_path), "eval.prompts=[]", "eval.edits=[]"]) == 2
    assert "eval.prompts" in capsys.readouterr().err
    assert main(["eval", "--config", str(config_path), "--adapter", str(tmp_path / "missing")]) == 2
    assert "no such adapter file" in capsys.readouterr().err
    # Was found only after every image had rendered (`eval images 8/8`, then "could not write .../report.json").
    (tmp_path / "taken").write_text("a file")
    argv = [
        "eval",
        "--config",
        str(config_path),
        "--output",
        str(tmp_path / "taken" / "eval"),
        f"model.pretrained={unloadable_model}",
    ]
    assert main(argv) == 2  # the model would fail to load: the output is checked before it
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "note: no --adapter or --checkpoints given: the report shows the base model alone, with no verdict"
    assert err[-1] == (
        f"error: could not write {tmp_path / 'taken' / 'eval' / 'report.json'}: a part of that path is a file, not "
        "a folder; choose a folder path and retry"
    )


def test_a_missing_edit_input_is_refused_before_the_model_loads(config_path, tmp_path):
    # It was read at the first edit's render, after the model had loaded and every prompt had rendered.
    cfg = load_config(config_path, [f"eval.edits=[{{images: [{tmp_path / 'gone.png'}], prompt: recolour}}]",
                                    "model.pretrained=/nonexistent"])  # fmt: skip
    with pytest.raises(ValueError, match=r"eval\.edits\[0\]\.images: .*gone\.png does not exist"):
        evaluate(cfg)
    cfg = load_config(config_path, ["eval.edits=[]", "eval.prompts=[]", "model.pretrained=/nonexistent",
                                    f"validation.edits=[{{images: [{tmp_path / 'gone.png'}], prompt: x}}]"])  # fmt: skip
    with pytest.raises(ValueError, match=r"validation\.edits\[0\]\.images: "):  # eval falls back to validation's
        evaluate(cfg)


def test_checkpoints_are_scored_on_the_runs_held_out_split(config_path, adapters, unloadable_model, tmp_path, capsys):
    run = _run_folder(tmp_path / "run", adapters, load_config(config_path, ["validation.held_out_fraction=0.1"]))
    # The model cannot load: the mismatch is reported before any model is loaded.
    argv = ["eval", "--config", str(config_path), "--checkpoints", str(run), f"model.pretrained={unloadable_model}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "validation.held_out_fraction is 0.3 here but 0.1 in the run" in err and str(run / "config.yaml") in err
    # A run that held out nothing: said before the model loads, with the fix (it was said after every render, and
    # its advice, "set it to the fraction the run held out", was then refused by the split check).
    save_config(load_config(config_path, ["validation.held_out_fraction=0"]), run / "config.yaml")
    assert main([*argv, "validation.held_out_fraction=0"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --checkpoints {run}: the run held out no items (validation.held_out_fraction: 0 in "
        f"{run / 'config.yaml'}), so its checkpoints have no held-out loss to rank them by; drop --checkpoints "
        "(--adapter still compares an adapter with the base model), or train with validation.held_out_fraction > 0"
    )
    # A setting that changes the loss but not the split is a note in the report, not an error.
    save_config(load_config(config_path, ["validation.seed=5"]), run / "config.yaml")
    assert check_run_config(load_config(config_path), run) == [
        "Held-out losses differ from the run's logged heldout_loss: validation.seed is 0 here but 5 in the run."
    ]


def test_the_held_out_loss_data_says_what_it_holds_out_and_not_the_training_batches(config_path, tiny_pipe, caplog):
    """eval printed the training set's bucket histogram and data-cache line, as if it trained on them."""
    cfg = load_config(config_path)
    for training, said in [(False, False), (True, True)]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="qwen_image_lora"):
            held_out = build_training_data(cfg, tiny_pipe, training=training).held_out
        assert held_out and "held out" in caplog.text and ("buckets (" in caplog.text) is said


def test_checkpoint_discovery_and_adapter_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="step-<N>"):
        find_checkpoints(tmp_path)
    for step in (100, 20):
        (tmp_path / "checkpoints" / f"step-{step:06d}" / "adapter").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-000200.tmp").mkdir()  # an interrupted save is ignored
    (tmp_path / "checkpoints" / "step-000007").mkdir()  # its adapter deleted: left out with a note, as when damaged
    notes = []
    assert [(s, n) for s, n, _ in find_checkpoints(tmp_path, notes)] == [(20, "step-000020"), (100, "step-000100")]
    assert notes == ["step-000007 is not scored: it has no adapter/ folder"]
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")  # the run finished: its final adapter joins
    (tmp_path / "training_metadata.json").write_text('{"steps": 150}')
    assert find_checkpoints(tmp_path)[-1] == (150, "final", tmp_path)
    # The last step's checkpoint holds the final adapter's weights: scored once, as "final"; EMA weights differ.
    last = tmp_path / "checkpoints" / "step-000150" / "adapter"
    last.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(last / "pytorch_lora_weights.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert [n for _, n, _ in find_checkpoints(tmp_path)] == ["step-000020", "step-000100", "final"]
    save_file({"w": torch.full((2,), 0.5)}, str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert [n for _, n, _ in find_checkpoints(tmp_path)] == ["step-000020", "step-000100", "step-000150", "final (EMA)"]
    names = _adapter_names([Path("a/brand"), Path("b/brand"), Path("c/base.safetensors")])
    assert list(names) == ["brand", "brand-2", "base-2"]


def test_eval_logs_a_wandb_table_with_images_offline(config_path, adapters, tiny_pipe, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    # W&B keeps the settings of its first use in this process: an earlier test's (online, no key) failed this one
    # whenever that test ran first in the same worker.
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    cfg = load_config(
        config_path, [f"eval.output_dir={out}", "eval.seeds=[0]", "eval.edits=[]", "tracking.backend=wandb"]
    )
    evaluate(cfg, [adapters["noisy"]], pipe=tiny_pipe)
    (run,) = list((out / "wandb").glob("offline-run-*"))
    tables = list(run.rglob("media/table/**/*.table.json"))
    assert tables, sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:5] == ["kind", "prompt", "seed", "variant", "image"]
    assert [row[3] for row in table["data"]] == ["base", "noisy"]
    assert list(run.rglob("media/images/**/*.png"))
    # The verdict line is in the run summary (offline runs keep it in the binary .wandb log).
    line = json.loads((out / "report.json").read_text())["verdicts"]["noisy"]["line"]
    wandb.teardown()  # wandb-core writes the log's tail after finish() returns (1 run in 4 read a bare header)
    log = next(run.glob("*.wandb")).read_bytes()
    assert b"eval/verdict/noisy" in log and line.split(" (")[0].encode() in log


def test_a_damaged_checkpoint_is_left_out_with_a_note_and_the_rest_are_ranked(config_path, adapters, tmp_path, capsys):
    """One checkpoint holding an inf ended the eval with an error after every image had been rendered: no report. A
    cut-short last checkpoint (the final step's) was a SafetensorError traceback."""
    run = _run_folder(tmp_path / "run", adapters, load_config(config_path))
    last = run / "checkpoints" / "step-000030" / "adapter"
    last.mkdir(parents=True)
    (last / "pytorch_lora_weights.safetensors").write_bytes(b"\x10" * 300)
    damaged = run / "checkpoints" / "step-000020" / "adapter" / "pytorch_lora_weights.safetensors"
    weights = load_file(damaged)
    weights[next(iter(weights))].view(-1)[0] = float("inf")
    save_file(weights, damaged)
    argv = ["eval", "--config", str(config_path), "--checkpoints", str(run), "--output", str(tmp_path / "report"),
            "eval.seeds=[0]", "eval.prompts=[]"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [c["name"] for c in data["checkpoints"]] == ["base", "step-000010", "final"]
    (note, cut) = [n for n in data["notes"] if "not scored" in n]
    assert note.startswith(f"step-000020 is not scored: {damaged}: ") and "NaN or infinite" in note
    assert cut.startswith("step-000030 is not scored: ") and "not a readable adapter file" in cut


def test_eval_refuses_an_adapter_given_twice_however_it_is_spelt(
    config_path, adapters, unloadable_model, tmp_path, capsys
):
    """`--adapter run --adapter run/pytorch_lora_weights.safetensors` rendered and scored one adapter twice, and so did
    a folder holding one file of another name and that file."""
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(adapters["noisy"] / "pytorch_lora_weights.safetensors", single / "my.safetensors")
    for folder, file in ((adapters["noisy"], "pytorch_lora_weights.safetensors"), (single, "my.safetensors")):
        argv = ["eval", "--config", str(config_path), "--adapter", str(folder), "--adapter", str(folder / file),
                f"model.pretrained={unloadable_model}"]  # fmt: skip
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --adapter {folder / file}: the same adapter (the same weights) as --adapter {folder}; give each "
            "adapter once"
        )


def test_the_report_of_another_runs_adapter_goes_into_that_run(config_path, adapters, tmp_path, capsys):
    """`eval --config brand.yaml --adapter runs/photos` wrote into brand.yaml's output_dir, whose studio page then
    showed another adapter's report as its own."""

    def home(*sources, overrides=()):
        cfg = load_config(config_path, list(overrides))
        _report_in_the_evaluated_run(cfg, [str(s) for s in sources])
        return Path(cfg.eval.output_dir)

    runs = {}
    for name in ("photos", "sketch", "run"):
        runs[name] = tmp_path / name
        shutil.copytree(adapters["noisy"], runs[name], dirs_exist_ok=True)
        (runs[name] / "run.json").write_text(json.dumps({"run_id": name, "started": 0}))
    own = tmp_path / "run" / "eval"
    assert home(runs["photos"]) == runs["photos"] / "eval"
    assert "the report goes into the evaluated run's folder" in capsys.readouterr().err
    assert home(runs["photos"] / "pytorch_lora_weights.safetensors") == runs["photos"] / "eval"  # its file
    assert home(runs["run"]) == own  # the config's own run
    assert home(runs["photos"], runs["sketch"]) == own  # several runs: no one home
    assert home(adapters["noop"]) == own  # not a run folder
    assert home(runs["photos"], overrides=[f"eval.output_dir={tmp_path / 'mine'}"]) == tmp_path / "mine"
