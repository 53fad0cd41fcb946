"""The console carries our lines and real problems only, and a model or adapter the hub cannot give fails in seconds
with one `error:` line. Each check runs a real process, as a user's command would, so no test harness's own
warning capture can hide a line that comes back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_image_lora import console
from qwen_image_lora.data.report import Report

ROOT = Path(__file__).resolve().parents[1]
NOISE = (
    "Traceback",
    "UserWarning",
    "Skipping publisher",
    "Already found a",
    "was active which is now deleted",
    "true_cfg_scale is passed",
    "Loading weights",
    "Writing model shards",
    "Retry",
    "Unable to import `torchao`",
    "torch.float32 for integer quantization",
    "led to missing keys",
    "Token indices sequence length",
    "No CUDA runtime is found",
)

# Every noise source above, in one process: build a model, load it, two adapters (one's name inside the other's), a
# generation with a guidance
# scale but no negative prompt, the active adapter dropped while another remains, bitsandbytes' kernel lookup, and
# inductor's note on a compiled graph's complex operators (said as inductor says it: compiling takes ~20 s).
SCRIPT = """
import logging, sys
from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.tiny_model import make_tiny_model
logging.basicConfig(level=logging.WARNING)
model = make_tiny_model(sys.argv[1])
kernels = logging.getLogger("kernels._internals.hf_hub")
kernels.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging "
                "Face Hub is in offline mode.")
kernels.warning("kernels: a real problem still shows")
from diffusers.quantizers.torchao import torchao_quantizer  # warns about torchao classes it cannot find
import bitsandbytes  # the real lookup, on CPUs where bitsandbytes makes it
import torch
from qwen_image_lora import model as qmodel
qmodel.load_transformer(model, torch.float32, "int8")  # diffusers: "only bfloat16 is supported" (it trains in fp32)
qmodel.load_captioner(model, "float32")  # `data caption`'s model: transformers' "Loading weights" bar
logging.getLogger(torchao_quantizer.__name__).warning(
    "You are trying to set torch_dtype to torch.float16 for integer quantization, but only bfloat16 is supported")
gen = Generator.from_pretrained(model, dtype="float32", device="cpu", resolution=64)
gen.adapters.load(sys.argv[2], name="a2")
gen.adapters.load(sys.argv[3], name="a")  # a substring of a2: diffusers took a2's keys for a's, "missing"
gen.adapters.set({"a": 1.0})
gen.generate(GenerationRequest(prompt="a bottle", guidance_scale=4.0, num_inference_steps=1, width=64, height=64))
gen.adapters.unload("a")
gen.pipe.processor.tokenizer("a " * 40000)  # past the tokenizer's context: the doctor names such a caption itself
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
import warnings
warnings.warn_explicit("Torchinductor does not support code generation for complex operators. Performance may be "
                       "worse than eager.", UserWarning, "lowering.py", 1, module="torch._inductor.lowering")
warnings.warn_explicit("inductor: a real problem still shows", UserWarning, "lowering.py", 2,
                       module="torch._inductor.lowering")
print("done", gen.adapters.active)
"""


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), **extra}
    env.pop("PYTHONWARNINGS", None)
    return env


def test_a_session_of_the_python_api_prints_no_library_noise(tmp_path, make_adapter, tiny_model_dir):
    a, b = make_adapter(tiny_model_dir, tmp_path / "a", 0.1), make_adapter(tiny_model_dir, tmp_path / "b", 0.1, seed=1)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "model"), str(a), str(b)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "done {}"
    real = "UserWarning: inductor: a real problem still shows"  # filtered by exact text, not the whole module
    assert real in done.stderr
    assert [n for n in NOISE if n in done.stderr.replace(real, "")] == [], done.stderr[-3000:]
    assert "kernels: a real problem still shows" in done.stderr  # filtered by exact text, not the whole logger
    assert "torch.float16 for integer quantization" in done.stderr


def _qwen_lora(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "qwen-lora"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True, text=True, timeout=120)


# A closed loopback port: the hub refuses at once, as an unreachable one does after its timeout.
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize(
    "env, why",
    [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"), (UNREACHABLE, "could not be reached")],
    ids=["offline", "unreachable"],
)
def test_generate_with_the_default_model_uncached_is_one_error_line(tmp_path, env, why):
    done = _qwen_lora(tmp_path, "generate", "--prompt", "a bottle", "--output", "g.png", **env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("note: no config given: using the default model Qwen/Qwen-Image-2.1")
    assert len(lines) == 2 and lines[1].startswith("error: model.pretrained: Qwen/Qwen-Image-2.1 is not in the local")
    assert why in lines[1] and "hf download Qwen/Qwen-Image-2.1" in lines[1], lines[1]
    assert not (tmp_path / "g.png").exists()


def test_an_uncached_hub_adapter_is_one_error_line_naming_it(tmp_path, tiny_model_dir):
    done = _qwen_lora(
        tmp_path,
        "generate",
        "--model",
        str(tiny_model_dir),
        "--lora",
        "someone/brand-lora",
        "--prompt",
        "a bottle",
        "--output",
        "g.png",
        **UNREACHABLE,
    )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.count("\n") == 1 and "someone/brand-lora" in done.stderr and "could not be reached" in done.stderr
    )


def test_the_doctor_without_a_reachable_tokenizer_goes_on_and_says_so(tmp_path, sample_data_dir):
    done = _qwen_lora(tmp_path, "data", "doctor", str(sample_data_dir / "brand"), **UNREACHABLE)
    assert done.returncode == 0, done.stderr
    assert "could not load the tokenizer of Qwen/Qwen-Image-2.1" in done.stdout + done.stderr
    assert [n for n in NOISE if n in done.stderr] == []
    assert "(a config as the target or model.pretrained=DIR picks another)" in done.stderr  # it has no --config


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_trainer_refuses_an_uncached_model_before_torch_imports(tmp_path, rank):
    """It imported torch, accelerate and diffusers first: 10.8 s to this line; only the main rank says it."""
    cmd = [sys.executable, "-X", "importtime", str(ROOT / "train" / "lora.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
           "model.pretrained=someone/not-cached"]  # fmt: skip
    done = subprocess.run(
        cmd, env=_env(tmp_path, HF_HUB_OFFLINE="1", RANK=rank), capture_output=True, text=True, timeout=120
    )
    ours = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert done.returncode == 2 and not imported & {"torch", "accelerate", "diffusers"}, done.stderr[-2000:]
    said = "error: model.pretrained: someone/not-cached is not in the local Hugging Face cache"
    assert [line[: len(said)] for line in ours] == ([said] if rank == "0" else []), ours


def test_a_new_run_in_another_runs_folder_is_refused_before_torch_imports(tmp_path, tiny_model_dir, sample_data_dir):
    """`validate` said so in 0.4 s; the trainer said it after about 12 s of imports."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"")  # a finished run's adapter
    cmd = [sys.executable, "-X", "importtime", str(ROOT / "train" / "lora.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
           f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", f"output_dir={out}",
           "validation.edits=[]", "eval.edits=[]"]  # fmt: skip
    done = subprocess.run(cmd, env=_env(tmp_path, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    ours = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert done.returncode == 2 and not imported & {"torch", "accelerate", "diffusers"}, done.stderr[-2000:]
    assert ours == [f"error: output_dir {out} already holds another run (a finished adapter (pytorch_lora_weights."
                    "safetensors)). To continue it, add --resume latest; to start a new run, choose another "
                    f"output_dir, or add --overwrite to move the old run aside to {out.with_name('run.previous')} "
                    "(nothing is deleted)"], ours  # fmt: skip


def test_a_bad_trainer_command_line_is_said_once_before_the_imports(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train" / "lora.py"), "--resum", "latest"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("error:") == 1, done.stderr
    assert "the following arguments are required: --config" in done.stderr


def test_a_report_piped_into_a_reader_that_stops_is_no_traceback(tmp_path, sample_data_dir):
    """`qwen-lora data doctor DATA | head` ended in a BrokenPipeError traceback."""
    cmd = [sys.executable, "-m", "qwen_image_lora.cli", "data", "doctor", str(sample_data_dir / "brand")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as doctor:
        doctor.stdout.close()  # the reader is gone before the report is written
        err = doctor.stderr.read().decode()
    assert doctor.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_missing_key_of_the_adapter_being_loaded_still_shows(caplog):
    logger = logging.getLogger("diffusers.utils.peft_utils")
    head = "Loading adapter weights from state_dict led to missing keys in the model:"
    # The level held for the whole test: an earlier test in this process may have quietened diffusers' loggers.
    with caplog.at_level(logging.WARNING, logger=logger.name):
        with console.loading_adapter("run"):
            logger.warning(f"{head} blocks.0.to_q.lora_A.run2.weight, blocks.0.to_q.lora_B.run2.weight.")  # run2's
            logger.warning(f"{head} blocks.0.to_q.lora_A.run2.weight, blocks.1.to_k.lora_B.run.weight.")  # one is run's
        assert [r.getMessage().endswith("lora_B.run.weight.") for r in caplog.records] == [True]
        logger.warning(f"{head} blocks.0.to_q.lora_A.run2.weight.")  # the filter is gone after the load
    assert len(caplog.records) == 2


def test_the_eval_reports_first_plot_on_a_machine_says_nothing_of_matplotlibs_font_list(tmp_path):
    """The first `qwen-lora eval` printed matplotlib's INFO line "generated new fontManager"."""
    script = ("import logging; logging.basicConfig(level=logging.INFO); import qwen_image_lora; "
              "import matplotlib.font_manager; logging.getLogger('matplotlib.font_manager').info('a real line')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path, MPLCONFIGDIR=str(tmp_path / "mpl")),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "generated new fontManager" not in done.stderr and "a real line" in done.stderr


def test_an_image_with_a_damaged_exif_block_reads_without_a_library_warning(tmp_path):
    """Each such upload wrote PIL's two-line `TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data` to the log."""
    script = """
import io, struct, sys, warnings
from PIL import Image
from qwen_image_lora.images import decode_image
ifd = b"II*\\x00" + struct.pack("<I", 8) + struct.pack("<H", 5) + struct.pack("<HHII", 0x0112, 3, 1, 6)  # 5 entries, 1 there
buf = io.BytesIO()
Image.new("RGB", (32, 24)).save(buf, "JPEG", exif=b"Exif\\x00\\x00" + ifd)
print(decode_image(buf.getvalue()).size)
warnings.warn("a real warning still shows")
"""
    done = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "(24, 32)", done.stderr  # its orientation entry read
    assert "EXIF" not in done.stderr and "a real warning still shows" in done.stderr


def test_a_count_agrees_with_its_noun():
    """A count of one ("written by 1 processes", "1 errors") read as broken English in lines users see."""
    assert [console.counted(n, "line") for n in (0, 1, 2)] == ["0 lines", "1 line", "2 lines"]
    assert console.counted(1, "process", "processes") == "1 process"
    assert console.counted(3, "process", "processes") == "3 processes"
    report = Report("data", 1)
    report.add("error", "truncated", "a", "cut short")
    assert report.summary().startswith("1 item: 0 clean, 1 excluded; 1 error, 0 warnings")
