"""diffusers' example LoRA script (`examples/dreambooth/train_dreambooth_lora_qwenimage21.py`) timed against our
trainer and our training step at equal settings; used by scripts/bench_speed.py and scripts/bench_gpu_7b.py when
DIFFUSERS_EXAMPLE_SCRIPT points at a local copy of it (it is not vendored here).

The example is a whole program (model loading, latent caching, data loading, saving), so it runs as a subprocess
on a model folder holding the benchmarked transformer, once for N steps and once for 2N. Its settings match ours:
cached latents (`--cache_latents`), LoRA on to_q/to_k/to_v/to_out.0 with alpha = rank, batch 1, AdamW, gradient
clipping 1.0, one instance prompt encoded once, no validation and no intermediate checkpoints, TensorBoard logging.
Its s/step is read three ways: (t_2N - t_N) / N (start-up and the end-of-run work cancel, in theory: on a busy
machine its start-up varies by seconds, more than N steps take, so one round can be off by 2x); its progress bar's
final rate (tqdm's smoothed s/step of the last steps); and its loop's own per-step log (`loop_seconds`: the gaps
between the wall times of its per-step TensorBoard events, first quarter left out), the steadiest of the three.

The honest comparison is whole loop against whole loop, so with `trainer_modes` our own trainer runs the same way:
`train/lora.py` as a user runs it, a subprocess on the same model folder, the same images (cropped square to the
example's size, its prompt as every caption: the same latent grid and prompt length), the same settings
(`trainer_config`) and TensorBoard logging, for 2N steps, read through the same per-step log. Those "ours trainer"
rows are judged against the example's loop: data loading, guards, the loss log, signal checks, progress and
logging are all inside both. Our bare step (`train.memory_trace.training_step`, in-process, with a prompt of the
example's token count) is timed too, as before: it shows what the model step alone costs. The rounds alternate.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageOps
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qwen_image_lora import model as qmodel
from qwen_image_lora.sample_data import make_sample_data
from qwen_image_lora.tiny_model import make_tiny_model

PROMPT = "a photo of the qwnbrand bottle on a white background"
# The example's own progress bar at its end: "Steps: 100%|...| 60/60 [00:07<00:00,  8.13it/s, loss=...]"
_BAR_RATE = re.compile(r"Steps:\s+100%[^\[]*\[[^,\]]*,\s*([\d.]+)(it/s|s/it)")
LORA_LAYERS = "to_q,to_k,to_v,to_out.0"  # our `attention` preset
ROOT = Path(__file__).resolve().parents[1]


class ExampleError(RuntimeError):
    pass


def check_script(path: str | None) -> Path:
    """The example script's path, or ExampleError saying how to get it."""
    script = Path(path or "")
    if not path or not script.is_file() or script.name != "train_dreambooth_lora_qwenimage21.py":
        raise ExampleError(
            f"DIFFUSERS_EXAMPLE_SCRIPT={path!r} is not a copy of train_dreambooth_lora_qwenimage21.py; get it with "
            "`git clone --depth 1 https://github.com/huggingface/diffusers` (examples/dreambooth/) at the version "
            "matching the installed diffusers, or unset the variable"
        )
    return script


def model_folder(work: Path, transformer=None) -> Path:
    """The tiny checkpoint (tiny VAE, text encoder, tokenizer) with `transformer` in place of its own, whose
    in_channels / context_in_dim must be the tiny VAE's and text encoder's (16 and 32). Without `transformer`:
    the tiny checkpoint around a random 7B transformer (encoders of the matching widths)."""

    # The VAE of the real geometry, the only one the example accepts; its latents are cached before the timed
    # steps, so which VAE it is does not enter the timing.
    folder = make_tiny_model(work / "model", full_transformer=transformer is None, downsampling_vae=True)
    if transformer is not None:
        shutil.rmtree(folder / "transformer")
        transformer.save_pretrained(folder / "transformer")
    return folder


def images_folder(work: Path) -> Path:
    """The sample data's brand PNGs alone (the example opens every file of --instance_data_dir as an image)."""

    images = work / "images"
    images.mkdir(exist_ok=True)
    for png in sorted((make_sample_data(work / "sample-data") / "brand").glob("*.png")):
        shutil.copy(png, images / png.name)
    return images


def prompt_tokens(folder: Path, device="cpu") -> int:
    """How many prompt-embedding tokens the example trains with (its instance prompt through the pipeline)."""
    pipe = qmodel.load_pipeline(folder, torch.float32, device, transformer=False)
    return qmodel.encode_prompt(pipe, [PROMPT]).embeds.shape[1]


def run_example(script: Path, folder: Path, images: Path, out: Path, steps: int, resolution: int, rank: int,
                mixed_precision: str, threads: int | None,
                extra: list[str]) -> tuple[float, float | None, float | None]:  # fmt: skip
    """(wall seconds of one run of the example for `steps` steps, the s/step its progress bar shows at the end:
    tqdm's smoothed rate of the last steps, its loop's s/step from its per-step log (`loop_seconds`)); ExampleError
    with its output's tail if it fails."""
    cmd = [
        sys.executable, str(script), "--pretrained_model_name_or_path", str(folder),
        "--instance_data_dir", str(images), "--instance_prompt", PROMPT, "--resolution", str(resolution),
        "--train_batch_size", "1", "--rank", str(rank), "--lora_alpha", str(rank), "--lora_layers", LORA_LAYERS,
        "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--seed", "0",
        "--mixed_precision", mixed_precision, "--cache_latents", "--checkpointing_steps", str(10 * steps + 10),
        "--report_to", "tensorboard", "--output_dir", str(out), *extra,
    ]  # fmt: skip
    seconds, proc = _run_timed(cmd, out, threads, "the example script")
    rates = _BAR_RATE.findall(proc.stderr + proc.stdout)
    bar = None
    if rates:
        value, unit = float(rates[-1][0]), rates[-1][1]
        bar = 1 / value if unit == "it/s" else value
    return seconds, bar, loop_seconds(out)


def _run_timed(cmd: list[str], out: Path, threads: int | None, what: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise ExampleError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}\ncommand: {' '.join(cmd)}")  # fmt: skip
    return seconds, proc


def loop_seconds(out: Path, tag: str = "loss") -> float | None:
    """A training loop's s/step from its own per-step TensorBoard log under `out`: the mean gap between the
    wall times of consecutive `tag` events over the last three quarters of the run (the first quarter holds
    start-up, compilation and our first epoch's encoding). Both loops log once per step, so a gap is one whole
    iteration, whatever else it does (data, logging, checks); None without enough events."""
    events = []
    for path in sorted(out.rglob("events.out.tfevents*")):
        log = EventAccumulator(str(path), size_guidance={"scalars": 0})
        log.Reload()
        if tag in log.Tags()["scalars"]:
            events += log.Scalars(tag)
    events.sort(key=lambda e: e.step)
    times = [e.wall_time for e in events[len(events) // 4 :]]
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 3 else None


def trainer_data(work: Path, images: Path, resolution: int) -> Path:
    """The example's images as our trainer gets them: resized to cover `resolution` x `resolution` and cropped (as
    the example's transform does) with its instance prompt as every caption: the same latent grid and prompt."""
    data = work / "trainer-data"
    data.mkdir(exist_ok=True)
    for png in sorted(images.glob("*.png")):
        ImageOps.fit(Image.open(png), (resolution, resolution)).save(data / png.name)
        (data / png.name).with_suffix(".txt").write_text(PROMPT)
    return data


def trainer_config(work: Path, folder: Path, data: Path, resolution: int, rank: int, mixed_precision: str) -> Path:
    """Our recipe's config at the example's settings: batch 1, LoRA on attention with alpha = rank, AdamW at 1e-4,
    clipping 1.0, uniform timesteps, no gradient checkpointing, no validation or intermediate checkpoints, logged
    to TensorBoard every step as the example is. No data cache folder: the first epoch encodes in memory."""
    cfg = {
        "model": {"pretrained": str(folder), "dtype": "float32" if mixed_precision == "no" else "bfloat16"},
        "data": {"path": str(data), "resolution": resolution, "cache_dir": None},
        "lora": {"rank": rank, "alpha": float(rank), "targets": "attention"},
        "optim": {"lr": 1.0e-4, "max_grad_norm": 1.0},
        "train": {"batch_size": 1, "mixed_precision": mixed_precision, "gradient_checkpointing": False, "seed": 0,
                  "timestep_sampling": "uniform"},
        "checkpoint": {"every_steps": 1_000_000},
        "validation": {"every_steps": 0, "prompts": [], "edits": [], "held_out_fraction": 0.0},
        "tracking": {"backend": "tensorboard"},
    }  # fmt: skip
    path = work / "trainer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_trainer(config: Path, out: Path, steps: int, compile: str | bool, threads: int | None) -> float:
    """Our whole trainer (`train/lora.py`, as a user runs it) for `steps` steps; its loop's s/step (`loop_seconds`)."""
    cmd = [sys.executable, str(ROOT / "train" / "lora.py"), "--config", str(config), f"output_dir={out}",
           f"train.max_steps={steps}", f"model.compile={str(compile).lower()}"]  # fmt: skip
    _run_timed(cmd, out, threads, "our trainer")
    seconds = loop_seconds(out)
    if seconds is None:
        raise ExampleError(f"our trainer logged too few steps to time in {out} (train.max_steps={steps})")
    return seconds


def compare(run_example_once, ours: dict, steps: int, rounds: int, trainers: dict | None = None) -> dict:
    """Alternate in each round: the example for `steps` and `2 * steps` steps, each of our trainer runs for
    `2 * steps` steps, then each of our in-process cases for `steps` steps. `ours` maps a name to a zero-argument
    step function, `trainers` a name to a function of a step count returning a loop s/step. Returns {name: [s/step
    per round]} with the example under "example", its bar's rate under "example (its bar)" and its loop's s/step
    under "example (its loop)" when they could be read."""
    trainers = trainers or {}
    times = {"example": [], "example (its bar)": [], "example (its loop)": [], **{n: [] for n in [*trainers, *ours]}}
    for r in range(rounds):
        t_n, _, _ = run_example_once(steps)
        t_2n, bar, loop = run_example_once(2 * steps)
        times["example"].append((t_2n - t_n) / steps)
        if bar is not None:
            times["example (its bar)"].append(bar)
        if loop is not None:
            times["example (its loop)"].append(loop)
        for name, run in trainers.items():
            times[name].append(run(2 * steps))
        for name, step in ours.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / steps)
        print(f"  example round {r + 1}/{rounds}: example {times['example'][-1]:.4f} s/step (N={steps}: "
              f"{t_n:.1f} s, 2N: {t_2n:.1f} s)", flush=True)  # fmt: skip
    return times


def print_comparison(times: dict, target: float = 0.8, eager_target: float | None = None) -> None:
    """Medians over rounds, each ratio taken inside a round: against the difference estimate, against the example's
    own progress bar (start-up excluded, less noisy on a busy machine) and against its loop's per-step log. The
    verdict takes the difference estimate for our in-process steps and the loop log for our trainer's runs (each
    against the example measured the same way), and `eager_target` (if given) for our eager rows."""
    bases = {"(t_2N - t_N)/N": times["example"], "own bar": times.get("example (its bar)") or [],
             "loop": times.get("example (its loop)") or []}  # fmt: skip
    print(
        "\n| vs diffusers example (same run) | s/step | " + " | ".join(f"x example {b}" for b in bases) + " | verdict |"
    )
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        if not ts:
            continue
        rel = {b: statistics.median(t / e for t, e in zip(ts, base)) if base else None for b, base in bases.items()}
        judged = rel["loop" if "trainer" in name else "(t_2N - t_N)/N"]
        goal = eager_target if eager_target and "eager" in name else target
        verdict = "" if name.startswith("example") or judged is None else ("meets" if judged <= goal else "misses")
        cells = " | ".join("-" if r is None else f"{r:.3f}" for r in rel.values())
        print(f"| {name} | {statistics.median(ts):.4f} | {cells} | {verdict} {'' if not verdict else f'<= {goal}'} |")


def run_comparison(script: Path, make_ours: Callable[[int], dict], *, transformer, resolution: int, rank: int,
                   mixed_precision: str, threads: int | None, extra: list[str], steps: int, rounds: int,
                   target: float, trainer_modes: dict | None = None, eager_target: float | None = None) -> dict:  # fmt: skip
    """Set up the example's model folder (around `transformer`, see `model_folder`) and images, let `make_ours`
    build our step functions for the example's prompt length, alternate them (and our whole trainer in each of
    `trainer_modes`, name -> model.compile) with the example and print the table; returns the per-round s/step."""
    with tempfile.TemporaryDirectory(prefix="bench-example-") as tmp:
        work = Path(tmp)
        folder = model_folder(work, transformer)
        images = images_folder(work)
        ours = make_ours(prompt_tokens(folder))
        config = trainer_config(work, folder, trainer_data(work, images, resolution), resolution, rank, mixed_precision)
        trainers = {
            name: functools.partial(run_trainer, config, work / "ours-out", compile=mode, threads=threads)
            for name, mode in (trainer_modes or {}).items()
        }

        def once(n: int) -> tuple:
            return run_example(script, folder, images, work / "out", n, resolution, rank, mixed_precision,
                               threads, extra)  # fmt: skip

        times = compare(once, ours, steps, rounds, trainers)
    print_comparison(times, target, eager_target)
    return times
