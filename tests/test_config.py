import json
import re
from pathlib import Path

import pytest
from PIL import Image

from qwen_image_lora.cli import main
from qwen_image_lora.config import ConfigError, load_config, save_config
from qwen_image_lora.model import load_pipeline
from qwen_image_lora.train.early import schedule_warnings


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_load():
    for name in ("brand", "product_edit", "demo"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.train.max_steps >= 1
    assert load_config("configs/brand.yaml").model.pretrained == "Qwen/Qwen-Image-2.1"


def test_the_data_cache_is_one_folder_outside_any_run_unless_the_config_names_one(tmp_path, monkeypatch):
    """Runs in different output_dirs share one cache (#26 item 14): $QWEN_LORA_CACHE, else $XDG_CACHE_HOME, else
    ~/.cache; a cache_dir in the config, or null, wins."""
    monkeypatch.setenv("QWEN_LORA_CACHE", str(tmp_path / "env"))
    runs = [load_config(None, [f"output_dir={tmp_path / run}"]).data.cache_dir for run in ("a", "b")]
    assert runs == [str(tmp_path / "env")] * 2
    monkeypatch.delenv("QWEN_LORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_config(None).data.cache_dir == str(tmp_path / "xdg" / "qwen-image-lora")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(None).data.cache_dir == str(tmp_path / "home" / ".cache" / "qwen-image-lora")
    assert load_config(write(tmp_path, "data:\n  cache_dir: mine\n")).data.cache_dir == str(tmp_path / "mine")
    assert load_config(None, ["data.cache_dir=null"]).data.cache_dir is None


def test_unknown_key_names_field_and_suggests(tmp_path):
    p = write(tmp_path, "lora:\n  rnak: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rnak'; did you mean 'lora.rank'"):
        load_config(p)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*'train'"):
        load_config(write(tmp_path, "trian: {}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  max_steps: ten\n", r"train.max_steps must be int \(got 'ten'\)"),
        ("train:\n  mixed_precision: bf32\n", r"train.mixed_precision must be 'bf16' or 'fp16' or 'no'"),
        ("lora:\n  rank: 0\n", r"lora.rank: must be in 1..1024 \(got 0\)"),
        ("lora:\n  targets: everything\n", r"lora.targets: unknown preset 'everything'"),
        ("data:\n  resolution: 1000\n", r"data.resolution: must be a multiple of 32"),
        ("validation:\n  edits:\n    - images: []\n      prompt: x\n", r"validation.edits\[0\].images: give 1 to 10"),
        ("train:\n  gradient_checkpointing: sometimes\n", r"train.gradient_checkpointing must be bool or 'auto'"),
        ("train:\n  mixed_precision: no\n", r"\(got false\); YAML reads an unquoted no as false: quote it: .*\"no\""),
        ("optim:\n  max_grad_norm: -1\n", r"optim.max_grad_norm: must be > 0, or null for no clipping \(got -1.0\)"),
        ("optim:\n  max_grad_norm: 0\n", r"optim.max_grad_norm: must be > 0, or null for no clipping \(got 0.0\)"),
        ("optim:\n  lr: .nan\n", r"optim.lr must be a finite number \(got nan\)"),
        ("checkpoint:\n  keep_last: 0\n", r"checkpoint.keep_last: must be >= 1 \(got 0\)"),
        ("checkpoint:\n  every_steps: 0\n", r"checkpoint.every_steps: must be >= 1 \(got 0\)"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.seed=-1", r"train.seed: must be in 0..4294967295 \(got -1\)"),
        ("train.seed=99999999999", r"train.seed: must be in 0..4294967295 \(got 99999999999\)"),
        ("optim.lr=nan", r"optim.lr must be a finite number \(got nan\)"),
        ("optim.lr=inf", r"optim.lr must be a finite number \(got inf\)"),
        ("validation.guidance_scale=-inf", r"validation.guidance_scale must be a finite number \(got -inf\)"),
        ("serve.port=99999", r"serve.port: must be in 0..65535 \(got 99999\)"),
        ("optim.weight_decay=-0.1", r"optim.weight_decay: must be >= 0 \(got -0.1\)"),
        ("optim.eps=0", r"optim.eps: must be > 0 \(got 0.0\)"),
        ("train.logit_std=0", r"train.logit_std: must be > 0 \(got 0.0\)"),
        ("train.divergence_factor=1", r"train.divergence_factor: must be > 1 \(got 1.0\)"),
        (
            "model.attention_backend=bogus",
            r"model.attention_backend: 'bogus' is not a diffusers attention backend; one of .*flash",
        ),
        # A repeated seed re-renders one pair: n identical samples gave a zero-width interval and a verdict.
        ("eval.seeds=[1,1,1]", r"eval.seeds: must be distinct seeds >= 0 \(got \[1, 1, 1\]\)"),
        ("eval.seeds=[-1]", r"eval.seeds: must be distinct seeds >= 0"),
        # A repeated prompt or edit counts its images twice: 3 copies of one prompt read as n = 6 and "better".
        ("eval.prompts=[a, b, a]", r"eval.prompts\[2\]: 'a' is listed already \(spacing aside\); list each prompt"),
        # spacing aside, the same prompt renders all but the same images (palette distance 26.9656 against 26.9652)
        ("eval.prompts=['a bottle', ' a  bottle ']", r"eval.prompts\[1\]: ' a  bottle ' is listed already"),
        (
            "eval.edits=[{images: [x.png], prompt: 'p q'}, {images: [x.png], prompt: 'p  q'}]",
            r"eval.edits\[1\]: the same edit is listed already",
        ),
        ("validation.prompts=[a, a]", r"validation.prompts\[1\]: 'a' is listed already"),  # eval's fallback
        (
            "eval.edits=[{images: [x.png], prompt: p}, {images: [x.png], prompt: p}]",
            r"eval.edits\[1\]: the same edit is listed already",
        ),
        (  # the same file spelt another way was taken: 3 pairs read as n = 6 and a confident verdict
            "eval.edits=[{images: [/srv/in/x.png], prompt: p}, {images: [/srv/in/../in/x.png], prompt: p}]",
            r"eval.edits\[1\]: the same edit is listed already",
        ),
        # validate said OK; doctor, prepare and training each ended in a KeyError traceback from format_caption.
        (
            "data.caption_template='{trigger_word}, {caption}'",
            r"data.caption_template: unknown placeholder \{trigger_word\} in '\{trigger_word\}, \{caption\}'; it "
            r"takes \{caption\} and \{trigger\}",
        ),
        ("data.caption_template='{caption} {'", r"data.caption_template: not a template \(Single '\{' encountered"),
        (
            "data.caption_template='a {trigger} photo'",
            r"data.caption_template: no \{caption\} in 'a \{trigger\} photo'",
        ),
        (  # validate said OK, then the doctor failed on real captions with a traceback
            "data.caption_template='{caption} {trigger:{caption}}'",
            r"data.caption_template: \{trigger:\{caption\}\} is more than a placeholder",
        ),
        (  # trained "<built-in method title of str object ...>" into every caption
            "data.caption_template='{caption} {trigger.title}'",
            r"data.caption_template: \{trigger.title\} is more than a placeholder",
        ),
        ("data.repeats=5", r"data.repeats: one data set has nothing to balance against"),  # was accepted, unread
        ("serve.max_queue=0", r"serve.max_queue: must be >= 1 \(0 refuses every request\) \(got 0\)"),
        ("serve.max_steps=0", r"serve.max_steps: must be in 1\.\.1000"),
        ("serve.max_steps=5000", r"serve.max_steps: must be in 1\.\.1000 \(every edge's limit\) \(got 5000\)"),
        ("serve.max_guidance_scale=1000", r"serve.max_guidance_scale: must be > 0 and <= 100"),
        ("serve.max_side=-1", r"serve.max_side: must be in 32\.\.4096 \(got -1\)"),
        ("serve.max_side=8192", r"serve.max_side: must be in 32\.\.4096 \(got 8192\)"),
        ("validation.width=100032", r"validation.width: must be a positive multiple of 32 up to 4096 \(got 100032\)"),
        ("eval.height=4128", r"eval.height: must be a positive multiple of 32 up to 4096 \(got 4128\)"),
        ("serve.adapters=[{name: v1.5, path: x}]", r"serve.adapters\[0\].name: no '.' in a name .* e.g. 'v1_5'"),
        ("serve.adapters=[{name: a, path: x, weight: 100}]", r"serve.adapters\[0\].weight: must be a number from -4"),
        ("serve.adapters=[{name: x, path: a}, {name: x, path: b}]", r"serve.adapters: the name 'x' is given twice"),
    ],
)
def test_out_of_range_values_fail_at_load_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=rf"^on the command line, {re.escape(override)}: {message}"):
        load_config("configs/demo.yaml", [override])


def test_a_caption_template_indexing_its_trigger_still_loads():
    cfg = load_config(
        "configs/demo.yaml", ["data.trigger_word=qwnbrand", "data.caption_template='{trigger[0]} {caption}'"]
    )
    assert cfg.data.caption_template.format(caption="a mug", trigger=cfg.data.trigger_word) == "q a mug"


@pytest.mark.parametrize("project", ["brand/lora", "a:b", "x" * 129, '""'])
def test_a_project_wandb_refuses_is_refused_at_load_not_after_the_weights(project):
    with pytest.raises(ConfigError, match=r"tracking.project: .* is not a W&B project name: 1 to 128 characters"):
        load_config("configs/demo.yaml", ["tracking.backend=wandb", f"tracking.project={project}"])
    load_config("configs/demo.yaml", ["tracking.backend=tensorboard", f"tracking.project={project}"])


def test_a_bad_override_is_blamed_on_the_command_line_and_a_bad_file_value_on_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lora: {rank: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(config, ["lora.rank=4", "train.max_steps=-1"])
    assert str(e.value) == "on the command line, train.max_steps=-1: train.max_steps: must be >= 1 (got -1)"
    with pytest.raises(ConfigError, match=r"^on the command line, train\.max_stepz=3: unknown key 'train\.max_stepz'"):
        load_config(config, ["lora.rank=4", "train.max_stepz=3"])
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: lora\.rank: must be in 1\.\.1024 \(got 0\)"):
        load_config(config, ["train.max_steps=3"])  # the file's own value, another key overridden
    with pytest.raises(ConfigError, match=r"^on the command line, lora\.rank=2048: lora\.rank: must be"):
        load_config(config, ["lora.rank=0", "lora.rank=2048"])  # the last override of a key is the one that counts
    # An unknown section, and a `${key}` that is not set, given on the command line were blamed on the file.
    with pytest.raises(ConfigError, match=r"^on the command line, foo\.bar=1: unknown key 'foo'; valid keys"):
        load_config(config, ["lora.rank=4", "foo.bar=1"])
    with pytest.raises(
        ConfigError, match=r"^on the command line, eval\.output_dir=\$\{outputdir\}/eval: \$\{outputdir\} "
    ):
        load_config(config, ["lora.rank=4", "eval.output_dir=${outputdir}/eval"])
    config.write_text("lora: {rank: 4}\neval: {output_dir: '${outputdir}/eval'}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: \$\{{outputdir\}} refers to a key"):
        load_config(config, ["eval.seeds=[1]"])  # the file's own reference


def test_max_grad_norm_null_means_no_clipping_and_round_trips(tmp_path):
    cfg = load_config("configs/demo.yaml", ["optim.max_grad_norm=null"])
    assert cfg.optim.max_grad_norm is None
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml").optim.max_grad_norm is None
    assert load_config(None, ["optim.max_grad_norm=0.5", "train.seed=4294967295"]).train.seed == 2**32 - 1


def test_a_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path):
    text = Path("configs/demo.yaml").read_text()
    first, last = text.splitlines().index("train:") + 1, len(text.splitlines()) + 2
    with pytest.raises(ConfigError, match=rf"c.yaml: train: given twice \(lines {first} and {last}\)"):
        load_config(write(tmp_path, text + "\ntrain:\n  seed: 1\n"))
    with pytest.raises(ConfigError, match=r"validation.edits\[0\].prompt: given twice \(lines 4 and 5\)"):
        load_config(write(tmp_path, "validation:\n  edits:\n    - images: [a.png]\n      prompt: a\n      prompt: b\n"))
    with pytest.raises(
        ConfigError, match=r"on the command line, data.columns=\{a: x, a: y\}: data.columns.a: given twice"
    ):
        load_config(None, ["data.columns={a: x, a: y}"])


def test_an_alias_bomb_and_a_file_that_is_not_utf8_are_refused_at_once(tmp_path):
    """Nine nested aliases of nine items (9**9 values) kept `validate` busy for minutes; a Latin-1 file was a
    UnicodeDecodeError traceback. Anchors of ordinary size still work."""
    rows = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    rows += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    with pytest.raises(ConfigError, match=r"expands to 4\d\d,\d{3},\d{3} values through YAML aliases"):
        load_config(write(tmp_path, "\n".join(rows) + "\n"))
    prompts = "validation:\n  prompts: &p [a bottle, a can]\neval:\n  prompts: *p\n"
    assert load_config(write(tmp_path, prompts)).eval.prompts == ["a bottle", "a can"]
    (tmp_path / "latin1.yaml").write_bytes("eval:\n  prompts: [caf\xe9]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 21\); save it as UTF-8"):
        load_config(tmp_path / "latin1.yaml")


def test_a_hex_colour_is_text_on_the_command_line_and_a_file_says_to_quote_it(tmp_path):
    """`data.background=#000000` read as a YAML comment: 'data.background must be str (got None)'."""
    assert load_config(None, ["data.background=#000000"]).data.background == "#000000"
    with pytest.raises(
        ConfigError,
        match=r'data.background must be str \(got null\); .* \(a YAML comment\), is null: quote it: background: "#000000"',
    ):
        load_config(write(tmp_path, "data:\n  background: #000000\n"))
    # An empty override (`output_dir=`) is null too; a setting that allows false or a word says so in YAML's spelling.
    with pytest.raises(
        ConfigError, match=r"output_dir must be str \(got null\); an empty value, or one starting with #"
    ):
        load_config(None, ["output_dir="])
    with pytest.raises(ConfigError, match=r"model.compile must be false or 'blocks' or 'full' \(got true\)$"):
        load_config(None, ["model.compile=true"])  # was "must be False or 'blocks' or 'full' (got True)"


def test_a_value_that_refers_to_itself_is_refused_naming_it():
    """`output_dir=${output_dir}/x` validated as OK, with output_dir ten "/x" deep."""
    for overrides in (
        ["output_dir=${output_dir}/x"],
        ["output_dir=${data.cache_dir}/x", "data.cache_dir=${output_dir}/c"],
    ):
        with pytest.raises(
            ConfigError, match=r"refers to itself through \$\{(output_dir|data.cache_dir)\}; a value cannot"
        ):
            load_config(None, overrides)


def test_an_unquoted_aspect_ratio_says_to_quote_it(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r'validation.aspect_ratio: 16:9 \(line 2\) reads as the base-60 number 969 .*quote it: aspect_ratio: "16:9"',
    ):
        load_config(write(tmp_path, "validation:\n  aspect_ratio: 16:9\n"))
    with pytest.raises(ConfigError) as on_command_line:  # it named "line 1" and YAML's quoting, not the shell's
        load_config(None, ["validation.aspect_ratio=16:9"])
    assert str(on_command_line.value) == (
        "on the command line, validation.aspect_ratio=16:9: validation.aspect_ratio: 16:9 reads as the base-60 number "
        "969 in YAML; quote it: 'validation.aspect_ratio=\"16:9\"'"
    )
    assert load_config(None, ['validation.aspect_ratio="16:9"']).validation.aspect_ratio == "16:9"  # as it says
    with pytest.raises(
        ConfigError, match=r'tracking.run_name must be str or null \(got 2024\); quote it: run_name: "2024"'
    ):
        load_config(None, ["tracking.run_name=2024"])
    assert (
        load_config(write(tmp_path, 'validation:\n  aspect_ratio: "16:9"\n', "q.yaml")).validation.aspect_ratio
        == "16:9"
    )


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(
        write(tmp_path, "train:\n  max_steps: 100\n"),
        ["train.max_steps=10", "lora.targets=[to_q, to_v]", "train.gradient_checkpointing=auto", "optim.lr=3e-4"],
    )
    assert cfg.train.max_steps == 10
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.train.gradient_checkpointing == "auto"
    assert cfg.optim.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="train.batch_size must be int"):
        load_config(None, ["train.batch_size=two"])


def test_paths_resolve_relative_to_config_and_interpolate(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    text = "output_dir: ../runs/x\nmodel:\n  pretrained: ../models/tiny\ndata:\n  path: data\n  cache_dir: ${output_dir}/c\n"
    cfg = load_config(write(sub, text))
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.model.pretrained == str(tmp_path / "models" / "tiny")
    assert cfg.data.path == str(sub / "data")
    assert cfg.data.cache_dir == str(tmp_path / "runs" / "x" / "c")
    # hub ids are left alone
    assert (
        load_config(write(sub, "model:\n  pretrained: Qwen/Qwen-Image-2.1\n", "h.yaml")).model.pretrained
        == "Qwen/Qwen-Image-2.1"
    )


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/demo.yaml", ["train.max_steps=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_cli_validate_reports_field(capsys, tiny_model_dir, sample_data_dir):

    assert main(["validate", "configs/demo.yaml", "train.max_stepz=3"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert main(["validate", "configs/demo.yaml", "model.attention_backend=bogus"]) == 2
    assert "model.attention_backend: 'bogus' is not a diffusers attention backend" in capsys.readouterr().err
    # The edits' inputs named in demo.yaml exist once the demo has run; the sample data's are the same files.
    edits = [f"{section}.edits=[{{images: [{sample_data_dir / 'edits' / '000_source.png'}], prompt: x}}]"
             for section in ("validation", "eval")]  # fmt: skip
    found = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'manifest.jsonl'}", *edits]
    assert main(["validate", "configs/demo.yaml", *found]) == 0
    items = [json.loads(line) for line in (sample_data_dir / "manifest.jsonl").read_text().splitlines()]
    edits = sum("sources" in row for row in items)
    assert f"{len(items)} items ({len(items) - edits} t2i, {edits} edit)" in capsys.readouterr().out


def test_a_command_without_its_config_names_only_the_config(capsys):
    """argparse listed the optional overrides as required too: 'required: config, overrides'."""
    assert main(["validate"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: validate: give the config, e.g. `qwen-lora validate configs/brand.yaml`"
    )


def test_validate_takes_the_config_as_the_other_commands_do(capsys, tiny_model_dir, sample_data_dir):
    """`qwen-lora validate --config CFG` was refused ("unrecognized arguments"): every other command spells it so."""
    found = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", "validation.edits=[]",
             "eval.edits=[]"]  # fmt: skip
    assert main(["validate", "--config", "configs/demo.yaml", *found]) == 0
    assert capsys.readouterr().out.startswith("configs/demo.yaml: OK")
    assert main(["validate", "--config", "configs/demo.yaml", "train.max_stepz=3"]) == 2
    assert "train.max_stepz" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["model.pretrained", "data.path"])
def test_cli_validate_checks_that_paths_exist(field, tmp_path, capsys, tiny_model_dir, sample_data_dir):

    found = {"model.pretrained": str(tiny_model_dir), "data.path": str(sample_data_dir / "brand")}
    found[field] = str(tmp_path / "nope")
    assert main(["validate", "configs/demo.yaml", *(f"{k}={v}" for k, v in found.items())]) == 2
    err = capsys.readouterr().err
    assert f"{field}: {tmp_path / 'nope'} does not exist" in err
    if field == "model.pretrained":
        assert "qwen-lora make-tiny-model" in err
    else:  # the next step, not only the problem
        assert "; point it at a folder of images with .txt captions, a .jsonl/.csv manifest or a Hugging Face" in err


def test_cli_validate_checks_the_previews_input_images(tmp_path, capsys, tiny_model_dir, sample_data_dir):
    """validate said OK, and training then stopped on the missing file."""
    paths = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}"]
    edits = f"validation.edits=[{{images: [{tmp_path / 'nope.png'}], prompt: x}}]"
    assert main(["validate", "configs/demo.yaml", *paths, edits]) == 2
    assert f"validation.edits[0].images: {tmp_path / 'nope.png'} does not exist" in capsys.readouterr().err


def test_cli_validate_checks_offload_blocks_against_the_models_block_count(capsys, tiny_model_dir, sample_data_dir):
    """validate said OK to offloading 3 blocks of the tiny model's 2; the trainer refused it after loading."""
    paths = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}"]
    paths += ["validation.edits=[]", "eval.edits=[]", "train.gradient_checkpointing=true"]  # offloaded: recomputed
    blocks = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())["num_layers"]
    assert main(["validate", "configs/demo.yaml", *paths, f"train.offload_blocks={blocks}"]) == 0
    capsys.readouterr()
    assert main(["validate", "configs/demo.yaml", *paths, f"train.offload_blocks={blocks + 1}"]) == 2
    err = capsys.readouterr().err
    assert f"train.offload_blocks: {blocks + 1} is more than the transformer's {blocks} blocks" in err


def test_cli_validate_checks_that_the_data_source_parses(tmp_path, capsys, tiny_model_dir):

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png", "caption": "x"}\n{"caption": "no image"}\n')
    argv = ["validate", "configs/demo.yaml", f"model.pretrained={tiny_model_dir}", f"data.path={manifest}"]
    assert main(argv) == 2
    assert "m.jsonl:2: t2i rows need 'image'" in capsys.readouterr().err
    csv = tmp_path / "m.csv"  # another tool's column names: the error shows the row's own, so the fix is plain
    csv.write_text("file,text\na.png,x\n")
    assert main([*argv[:-1], f"data.path={csv}"]) == 2
    assert "m.csv:2: t2i rows need 'image' (and 'caption'); this row has 'file', 'text'" in capsys.readouterr().err


def test_a_missing_local_model_fails_before_loading_naming_the_path(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # "outputs/nope" looks like a hub id, but outputs/ is a local folder: a typo
    for pretrained in ("outputs/nope", str(tmp_path / "models" / "tiny")):
        with pytest.raises(
            FileNotFoundError, match=rf"model.pretrained: {pretrained} does not exist.*qwen-lora make-tiny-model"
        ):
            load_pipeline(pretrained)


def test_cli_validate_refuses_an_output_dir_nested_with_another_runs(tmp_path, capsys, tiny_model_dir, sample_data_dir):
    """validate said OK for a folder training then refused."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"run_id": "r1", "started": 0}')
    paths = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", "validation.edits=[]",
             "eval.edits=[]"]  # fmt: skip
    assert main(["validate", "configs/demo.yaml", *paths, f"output_dir={tmp_path / 'run' / 'sub'}"]) == 2
    assert f"lies inside the folder of run r1 ({tmp_path / 'run'})" in capsys.readouterr().err
    assert main(["validate", "configs/demo.yaml", *paths, f"output_dir={tmp_path}"]) == 2
    assert f"output_dir {tmp_path} holds the folder of another run ({tmp_path / 'run'})" in capsys.readouterr().err
    assert main(["validate", "configs/demo.yaml", *paths, f"output_dir={tmp_path / 'run'}"]) == 0  # its own folder


def test_cli_validate_says_what_the_trainer_would_of_the_output_dir_the_schedule_and_masks(
    tmp_path, capsys, tiny_model_dir, sample_data_dir
):
    """validate said OK to an output_dir holding a finished run (the trainer then asks for --resume or --overwrite),
    to one holding the user's own config.yaml (which training replaced), to a warm-up longer than the run (the rate
    never reaches optim.lr) and to a manifest mask that does not exist."""
    paths = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", "validation.edits=[]",
             "eval.edits=[]", "train.max_steps=20", "checkpoint.every_steps=10"]  # fmt: skip
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert main(["validate", "configs/demo.yaml", *paths, f"output_dir={finished}", "optim.warmup_steps=500"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == [
        "  warning: optim.warmup_steps=500 >= train.max_steps=20: the learning rate never reaches optim.lr (at most 4% "
        "of it); lower the warm-up",
        f"  note: output_dir {finished} already holds another run (a finished adapter (pytorch_lora_weights.safetensors)"
        "). To continue it, add --resume latest; to start a new run, choose another output_dir, or add --overwrite to "
        f"move the old run aside to {tmp_path / 'finished.previous'} (nothing is deleted)",
    ]
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("# mine\n")
    assert main(["validate", "configs/demo.yaml", *paths, f"output_dir={project}"]) == 2
    assert f"error: output_dir {project} holds config.yaml, which no run wrote" in capsys.readouterr().err
    Image.new("RGB", (64, 64)).save(tmp_path / "t.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"target": "t.png", "instruction": "x", "sources": ["t.png"], "mask": "gone.png"}))
    assert main(["validate", "configs/demo.yaml", *paths[:1], f"data.path={manifest}", *paths[2:]]) == 2
    assert capsys.readouterr().err.strip() == (  # it said OK, and training then found nothing it could train
        f"error: data.path: every item names a missing file, e.g. m.jsonl:1 ({tmp_path / 'gone.png'} does not "
        "exist); a manifest's paths are relative to its folder"
    )
    manifest.write_text(manifest.read_text() + "\n" + json.dumps({"image": "t.png", "caption": "x"}) + "\n")
    assert main(["validate", "configs/demo.yaml", *paths[:1], f"data.path={manifest}", *paths[2:]]) == 0
    assert f"1 name a missing file, e.g. m.jsonl:1 ({tmp_path / 'gone.png'} does not exist)" in capsys.readouterr().out


def test_yaml_python_cannot_read_is_one_line_naming_where(tmp_path):
    """A 5,000-digit override and a file nested 100,000 deep were tracebacks from PyYAML's constructor."""
    with pytest.raises(ConfigError, match=r"^on the command line, validation.seed=9+: a number of more than 4,300 "):
        load_config(None, ["validation.seed=" + "9" * 5000])
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(deep))}: nested too deeply to read"):
        load_config(deep)


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    """Was PyYAML's several lines, squashed into one with its caret drawing ('in "<unicode string>", line 2...')."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n bad: x\n")
    with pytest.raises(ConfigError) as refused:
        load_config(bad)
    assert str(refused.value) == (
        f"{bad}: not valid YAML at line 3, column 2: expected <block end>, but found '<block mapping start>' (while "
        "parsing a block mapping)"
    )


@pytest.mark.parametrize(
    ("name", "lr", "said"),
    [("adamw", 1e-20, "barely moves"), ("adamw8bit", 0.5, "tends to diverge"), ("prodigy", 1e-4, "barely moves"),
     ("adamw", 1e-4, None), ("adamw", 5e-3, None), ("prodigy", 1.0, None)],
)  # fmt: skip
def test_a_learning_rate_outside_where_the_optimizer_trains_a_lora_is_a_warning(name, lr, said):
    """`optim.lr=1e-20` trained 1000 steps without a word, as did prodigy given AdamW's 1e-4 (its lr multiplies
    the step it finds)."""
    cfg = load_config("configs/demo.yaml", [f"optim.name={name}", f"optim.lr={lr}"])
    lr_said = [w for w in schedule_warnings(cfg) if w.startswith("optim.lr")]
    if said is None:
        assert lr_said == []
    else:
        assert len(lr_said) == 1 and lr_said[0].startswith(f"optim.lr={lr:g} is outside ") and said in lr_said[0]


def test_yaml_1_1s_exponent_strings_are_numbers_where_a_number_is_asked_and_text_elsewhere(tmp_path):
    """YAML 1.1 reads `1e-4` and `1.0e2` as strings. A loader that read them as floats everywhere (so that a batch
    line's "2" could be refused as text) refused a config's `1.0e2` and turned a pinned revision `8e41234` into
    inf; a batch line, JSON, is refused its "2" on its own (tests/test_inference_cli.py)."""
    cfg = load_config(write(tmp_path, "optim:\n  lr: 3e-4\n  weight_decay: 1.0e2\nmodel:\n  revision: 8e41234\n"),
                      ["validation.guidance_scale=4E0", "data.trigger_word=3e4"])  # fmt: skip
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.validation.guidance_scale) == (3e-4, 100.0, 4.0)
    assert (cfg.model.revision, cfg.data.trigger_word) == ("8e41234", "3e4")
