"""diffusers' example LoRA script (`examples/dreambooth/train_dreambooth_lora_qwenimage21.py`) timed against our
training step at equal settings; used by scripts/bench_speed.py and scripts/bench_gpu_7b.py when
DIFFUSERS_EXAMPLE_SCRIPT points at a local copy of it (it is not vendored here).

The example is a whole program (model loading, latent caching, data loading, saving), so it runs as a subprocess
on a model folder holding the benchmarked transformer, once for N steps and once for 2N, and its s/step is
(t_2N - t_N) / N: start-up and the end-of-run work cancel. Its settings match ours: cached latents
(`--cache_latents`), LoRA on to_q/to_k/to_v/to_out.0 with alpha = rank, batch 1, AdamW, gradient clipping 1.0,
one instance prompt encoded once, no validation and no intermediate checkpoints. Ours is timed in-process
(`train.memory_trace.training_step`, the trainer's step; scripts/bench_trainer_overhead.py measures our whole
loop within 3% of such a bare step) with a prompt of the example's token count. The rounds alternate the two.
The example's start-up varies by seconds on a busy machine, so N must be large against that (N * s/step >> the
spread); its own progress bar's final rate (tqdm's smoothed s/step of the last steps) is printed as a cross-check.
"""

from __future__ import annotations

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

from qwen_image_lora import model as qmodel
from qwen_image_lora.sample_data import make_sample_data
from qwen_image_lora.tiny_model import make_tiny_model

PROMPT = "a photo of the qwnbrand bottle on a white background"
# The example's own progress bar at its end: "Steps: 100%|...| 60/60 [00:07<00:00,  8.13it/s, loss=...]"
_BAR_RATE = re.compile(r"Steps:\s+100%[^\[]*\[[^,\]]*,\s*([\d.]+)(it/s|s/it)")
LORA_LAYERS = "to_q,to_k,to_v,to_out.0"  # our `attention` preset


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
                mixed_precision: str, threads: int | None, extra: list[str]) -> tuple[float, float | None]:  # fmt: skip
    """(wall seconds of one run of the example for `steps` steps, the s/step its progress bar shows at the end:
    tqdm's smoothed rate of the last steps, start-up excluded); ExampleError with its output's tail if it fails."""
    cmd = [
        sys.executable, str(script), "--pretrained_model_name_or_path", str(folder),
        "--instance_data_dir", str(images), "--instance_prompt", PROMPT, "--resolution", str(resolution),
        "--train_batch_size", "1", "--rank", str(rank), "--lora_alpha", str(rank), "--lora_layers", LORA_LAYERS,
        "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--seed", "0",
        "--mixed_precision", mixed_precision, "--cache_latents", "--checkpointing_steps", str(10 * steps + 10),
        "--report_to", "tensorboard", "--output_dir", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise ExampleError(f"the example script failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}\ncommand: {' '.join(cmd)}")  # fmt: skip
    rates = _BAR_RATE.findall(proc.stderr + proc.stdout)
    bar = None
    if rates:
        value, unit = float(rates[-1][0]), rates[-1][1]
        bar = 1 / value if unit == "it/s" else value
    return seconds, bar


def compare(run_example_once, ours: dict, steps: int, rounds: int) -> dict:
    """Alternate in each round: the example for `steps` and `2 * steps` steps, then each of our cases for `steps`
    steps. `ours` maps a name to a zero-argument step function. Returns {name: [s/step per round]} with the
    example under "example" and, when its progress bar could be read, the bar's rate under "example (its bar)"."""
    times = {"example": [], "example (its bar)": [], **{name: [] for name in ours}}
    for r in range(rounds):
        t_n, _ = run_example_once(steps)
        t_2n, bar = run_example_once(2 * steps)
        times["example"].append((t_2n - t_n) / steps)
        if bar is not None:
            times["example (its bar)"].append(bar)
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


def print_comparison(times: dict, target: float = 0.8) -> None:
    """Medians over rounds, each ratio taken inside a round: against the difference estimate (the issue's measure)
    and against the example's own progress bar (start-up excluded, less noisy on a busy machine)."""
    bar = times.get("example (its bar)") or []
    print("\n| vs diffusers example (same run) | s/step | x example (t_2N - t_N)/N | x example's own bar |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        if not ts:
            continue
        rel = statistics.median(t / e for t, e in zip(ts, times["example"]))
        rel_bar = f"{statistics.median(t / b for t, b in zip(ts, bar)):.3f}" if bar else "-"
        mark = "" if name.startswith("example") else f" ({'meets' if rel <= target else 'misses'} <= {target})"
        print(f"| {name} | {statistics.median(ts):.4f} | {rel:.3f}{mark} | {rel_bar} |")


def run_comparison(script: Path, make_ours: Callable[[int], dict], *, transformer, resolution: int, rank: int,
                   mixed_precision: str, threads: int | None, extra: list[str], steps: int, rounds: int,
                   target: float) -> dict:  # fmt: skip
    """Set up the example's model folder (around `transformer`, see `model_folder`) and images, let `make_ours`
    build our step functions for the example's prompt length, alternate them with the example and print the
    table; returns the per-round s/step."""
    with tempfile.TemporaryDirectory(prefix="bench-example-") as tmp:
        folder = model_folder(Path(tmp), transformer)
        images = images_folder(Path(tmp))
        ours = make_ours(prompt_tokens(folder))

        def once(n: int) -> float:
            return run_example(script, folder, images, Path(tmp) / "out", n, resolution, rank, mixed_precision,
                               threads, extra)  # fmt: skip

        times = compare(once, ours, steps, rounds)
    print_comparison(times, target)
    return times
