"""Speed of a LoRA training step and an inference forward on CPU: eager vs compiled vs flex attention, and
samples/s by batch size with and without a prompt padding mask. Ratios are measured in one run, cases alternating.

    nice -n 10 python scripts/bench_speed.py                     # medium model, 256 px, 1 thread, ~5 min
    python scripts/bench_speed.py --tiny --steps 1 --rounds 1 --batches 1,2   # smoke run on the 2-layer model
    DIFFUSERS_EXAMPLE_SCRIPT=/path/train_dreambooth_lora_qwenimage21.py python scripts/bench_speed.py

The model is a random Qwen-Image-2.1 transformer built in-process (default: 4 layers, 4 heads x 64, fp32), LoRA r4
on attention (`train.adapter.add_lora`), batches of random cached latents and prompt embeddings (no VAE or text
encoder). A training step is `train.memory_trace.training_step` (the trainer's flow-matching loss, backward,
clipping, AdamW step); an inference call is `model.predict_velocity` under no_grad. Speed switches are set
through `speed.configure_transformer`, the one place training and serving set them. Each case keeps its own
transformer; every round runs `--steps` steps of each case in turn (order rotated per round) and a ratio is
taken inside each round; the median of those ratios is printed next to the best round's s/step. The first call
of a case (the compile, for compiled cases: cold, in a fresh inductor cache) and `--warmup` more calls are not
timed; "first call s" is printed separately.

flex attention has no backward on CPU, so flex is measured for inference only here (training with flex is
CUDA-only: scripts/bench_gpu_7b.py --speed). The batch study runs equal-length prompts (mask None, as
`pad_prompt_embeds` gives) against padded ones (mask present: at batch 1 all True, at batch > 1 the last prompt a
quarter shorter), eager and compile=blocks.

Measured (shared 2-core CPU, 1 thread, torch 2.14.1, defaults; x = s/step against eager in the same rounds; two
runs): training compile=blocks x0.868-0.888 (first call 20-23 s), compile=full x0.818-0.850 (25-34 s); inference
compile=blocks x0.854-0.867, flex+blocks x1.42 (CPU flex kernel); batch 2 / 4 vs 1: samples/s x1.04-1.10 /
x1.03-1.14 eager, x1.05-1.09 / x1.06-1.07 blocks; a padded prompt's mask costs nothing on CPU (mask/no-mask
samples/s 0.98-1.03).

With DIFFUSERS_EXAMPLE_SCRIPT set, diffusers' example script is timed too, on a model folder holding the same
transformer, against our whole trainer (`train/lora.py` as a subprocess, eager and compile=blocks: "ours trainer")
and our in-process eager, compile=blocks and compile=full steps (scripts/example_speed.py says how). The trainer
rows are the claim about our trainer: whole loop against whole loop, each read from its own per-step log; the
bare-step rows show what the model step alone costs. The (t_2N - t_N)/N column is kept but is not to be trusted on
a shared machine: the example's start-up varies by more than N steps take (one round read 0.054 s/step where its
loop logged 0.095).

Against the real example script (diffusers 01e3a5d; shared 2-core CPU with other jobs running, 1 thread, medium
model, 256 px, r4, 3 rounds, N = 60; x = ours / the example's loop s/step in the same round):
    before (the loop read the transformer's dtype each step and all-reduced the stop flag on one process):
        ours trainer eager x1.006, trainer compile=blocks x0.910; bare step eager x0.967, blocks x0.844, full x0.790
    after: ours trainer eager x0.971, trainer compile=blocks x0.886; bare step eager x0.989, blocks x0.915, full x0.871
The trainer's LoRA layer (`train.adapter.LeanLoraLinear`: no multiply by a scale of 1.0, the sum in place) against
peft's own forward, `--groups lora --rounds 16 --steps 4`, the two cases alone: peft's x1.026 and x1.033 of ours (two
runs); in the whole-trainer comparison above the two differ by less than its noise (x1.000).
Between two runs of the same code the bare rows moved by up to 0.08, so the trainer's own gain is measured in one
process by scripts/bench_trainer_overhead.py (1.7% a step on this model). Eager stays near x1.0 because both loops
run the same diffusers forward and backward (~95% of a step; scripts/bench_trainer_overhead.py has the profile), and
what each loop adds besides is 1-3% of a step: ours <= 0.95x eager is not reachable without computing less.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qwen_image_lora

if str(ROOT) not in qwen_image_lora.__path__:  # run from a plain checkout: `train/` is `qwen_image_lora.train`
    qwen_image_lora.__path__.append(str(ROOT))

import example_speed  # scripts/, next to this file (the script directory is on sys.path)

from qwen_image_lora import model as qmodel
from qwen_image_lora import speed
from qwen_image_lora.config import LoRAConfig, OptimConfig
from qwen_image_lora.train import memory, memory_trace
from qwen_image_lora.train.adapter import LeanLoraLinear, add_lora
from qwen_image_lora.train.optim import build_optimizer

MEDIUM = {"in_channels": 16, "out_channels": 16, "num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4,
          "context_in_dim": 32, "mlp_ratio": 3, "axes_dims_rope": (8, 28, 28)}  # fmt: skip
# tiny_model.py's transformer
TINY = {"in_channels": 16, "out_channels": 16, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
        "context_in_dim": 32, "mlp_ratio": 2, "axes_dims_rope": (4, 6, 6)}  # fmt: skip


@dataclass
class Case:
    name: str
    group: str  # "train", "inference" or "batch"
    batch_size: int
    step: object  # () -> None
    first_call_s: float = 0.0
    times: list[float] = field(default_factory=list)  # s/step, one per round


def build_transformer(cfg: dict, rank: int, attention: str, compile, peft_forward: bool = False):
    torch.manual_seed(0)
    transformer = qmodel.transformer_class()(**cfg)
    params = add_lora(transformer, LoRAConfig(rank=rank, alpha=float(rank), targets="attention"))
    if peft_forward:  # what the trainer's LoRA layer saves: peft's own class back on every adapted layer
        for module in transformer.modules():
            if isinstance(module, LeanLoraLinear):
                module.__class__ = PeftLoraLinear
    speed.configure_transformer(transformer, attention=attention, compile=compile)
    return transformer, params


def make_inputs(cfg: dict, args, batch_size: int, masked: bool):
    shape = memory.StepShape(args.resolution, args.resolution, batch_size, args.prompt_tokens)
    torch.manual_seed(1)
    batch = memory_trace.build_step_inputs(shape, cfg, torch.float32)
    if masked:  # the last prompt a quarter shorter (all True at batch 1: the cost of carrying a mask alone)
        mask = torch.ones(batch_size, batch.prompt.embeds.shape[1], dtype=torch.bool)
        if batch_size > 1:
            mask[-1, -max(1, args.prompt_tokens // 4) :] = False
        batch.prompt.mask = mask
    else:
        batch.prompt.mask = None
    return batch


def train_step(transformer, params, batch, optimizer):
    memory_trace.training_step(transformer, batch, optimizer, params, contextlib.nullcontext(), 1.0, torch.float32)


@torch.no_grad()
def infer_step(transformer, batch):
    sigmas = torch.full((batch.latents.shape[0],), 0.5)
    qmodel.predict_velocity(transformer, batch.latents, batch.prompt, sigmas, dtype=torch.float32)


def make_case(cfg, args, name, group, kind, attention, compile, batch_size, masked, peft_forward=False) -> Case:
    transformer, params = build_transformer(cfg, args.rank, attention, compile, peft_forward)
    batch = make_inputs(cfg, args, batch_size, masked)
    if kind == "train":
        transformer.train()
        optimizer = build_optimizer(params, OptimConfig(lr=1e-4))  # the trainer's AdamW (fused)
        step = functools.partial(train_step, transformer, params, batch, optimizer)
    else:
        transformer.eval()
        step = functools.partial(infer_step, transformer, batch)
    start = time.perf_counter()
    step()
    case = Case(name, group, batch_size, step, first_call_s=time.perf_counter() - start)
    for _ in range(args.warmup):
        step()
    print(f"  ready: {name:<34} first call {case.first_call_s:6.1f} s", flush=True)
    return case


def build_cases(cfg, args) -> tuple[list[Case], dict]:
    """The cases in run order, and the batch study's cases by (mode, batch size, "mask" | "no-mask")."""
    cases, study = {}, {}

    def add(name, group, kind, attention, compile, batch_size=1, masked=False, peft_forward=False):
        key = (kind, attention, compile, batch_size, masked, peft_forward)
        if key not in cases:  # one case answers several tables (eager training at batch 1, no mask)
            cases[key] = make_case(cfg, args, name, group, kind, attention, compile, batch_size, masked, peft_forward)
        return cases[key]

    if "lora" in args.groups:  # the trainer's LoRA layer against peft's own forward, two cases alone (less noise)
        add("train eager", "train", "train", "sdpa-segments", False)
        add("train eager, peft's LoRA forward", "train", "train", "sdpa-segments", False, peft_forward=True)
    if "train" in args.groups:
        add("train eager", "train", "train", "sdpa-segments", False)
        add("train compile=blocks", "train", "train", "sdpa-segments", "blocks")
        add("train compile=full", "train", "train", "sdpa-segments", "full")
    if "inference" in args.groups:
        add("infer eager", "inference", "infer", "sdpa-segments", False)
        add("infer compile=blocks", "inference", "infer", "sdpa-segments", "blocks")
        add("infer flex+blocks", "inference", "infer", "flex", "blocks")
    if "batch" in args.groups:
        for compile in (False, "blocks"):
            for b in args.batches:
                for masked in (False, True):
                    mode = "blocks" if compile else "eager"
                    m = "mask" if masked else "no-mask"
                    study[mode, b, m] = add(
                        f"train {mode} b{b} {m}", "batch", "train", "sdpa-segments", compile, b, masked
                    )
    return list(cases.values()), study


def run_rounds(cases: list[Case], args) -> None:
    for r in range(args.rounds):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]  # rotate: no case always runs first
        for case in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                case.step()
            case.times.append((time.perf_counter() - start) / args.steps)
        print(f"  round {r + 1}/{args.rounds} done", flush=True)


def ratio(case: Case, base: Case) -> float:
    """Median over rounds of case/base s/step, each ratio taken inside one round."""
    return statistics.median(c / b for c, b in zip(case.times, base.times))


def report(cases: list[Case], study: dict) -> None:
    by_name = {c.name: c for c in cases}
    if any(c.group != "batch" for c in cases):
        print_speed_table(cases, by_name)
    if study:
        print_batch_table(study)


def print_speed_table(cases: list[Case], by_name: dict) -> None:
    # s/step: the best round (a shared CPU only ever adds time); ratios: the median of the per-round ratios.
    print("\n| case | s/step | samples/s | x eager s/step | first call s |")
    print("|---|---|---|---|---|")
    for c in cases:
        if c.group == "batch":
            continue
        base = by_name.get("train eager" if c.group == "train" else "infer eager")
        rel = f"{ratio(c, base):.3f}" if base else "-"
        best = min(c.times)
        print(f"| {c.name} | {best:.4f} | {c.batch_size / best:.2f} | {rel} | {c.first_call_s:.1f} |")
    print("| train flex (any compile) | - | - | - | CPU has no flex_attention backward: CUDA only |")


def print_batch_table(study: dict) -> None:
    print("\nBatch study (training; samples/s of the best round, ratios the median of per-round ratios):")
    print("| mode | batch | no-mask samples/s | mask samples/s | mask/no-mask samples/s | no-mask x b1 | mask x b1 |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("eager", "blocks"):
        b1 = {m: study.get((mode, 1, m)) for m in ("no-mask", "mask")}
        for b in sorted({b for _, b, _ in study}):
            row = {m: study[mode, b, m] for m in ("no-mask", "mask")}
            sps = {m: b / min(c.times) for m, c in row.items()}
            # samples/s ratio = (b / t) / (b' / t'), taken per round
            mask_vs = 1 / ratio(row["mask"], row["no-mask"])
            vs_b1 = {m: b / ratio(row[m], b1[m]) if b1[m] else float("nan") for m in row}
            print(f"| {mode} | {b} | {sps['no-mask']:.2f} | {sps['mask']:.2f} | {mask_vs:.3f} | "
                  f"{vs_b1['no-mask']:.2f} | {vs_b1['mask']:.2f} |")  # fmt: skip


def example_vs_ours(script: Path, cfg: dict, args) -> None:
    """diffusers' example script vs our eager and compiled training steps, same transformer and settings."""
    print("\ndiffusers example script vs ours (example: (t_2N - t_N) / N of two subprocess runs):", flush=True)

    def make_ours(prompt_tokens: int) -> dict:
        same = copy.copy(args)
        same.prompt_tokens = prompt_tokens
        variants = (("eager", False), ("compile=blocks", "blocks"), ("compile=full", "full"))
        return {
            f"ours {mode}": make_case(cfg, same, f"ours {mode}", "example", "train", "sdpa-segments", c, 1, False).step
            for mode, c in variants
        }

    torch.manual_seed(0)
    example_speed.run_comparison(
        script, make_ours, transformer=qmodel.transformer_class()(**cfg), resolution=args.resolution, rank=args.rank,
        mixed_precision="no", threads=args.threads, extra=[], steps=args.example_steps, rounds=args.rounds, target=0.8,
        trainer_modes={"ours trainer eager": False, "ours trainer compile=blocks": "blocks"}, eager_target=0.95,
    )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' 2-layer model instead of the medium one")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batches", default="1,2,4", help="batch sizes of the batch study")
    ap.add_argument("--groups", default="train,inference,batch", help='any of train, lora, inference, batch ("": none)')
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--example-steps", type=int, default=100, help="N of the example script's N / 2N runs")
    args = ap.parse_args(argv)
    script = None
    if "DIFFUSERS_EXAMPLE_SCRIPT" in os.environ:
        try:  # fail before anything is set or built
            script = example_speed.check_script(os.environ["DIFFUSERS_EXAMPLE_SCRIPT"])
        except example_speed.ExampleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args.batches = [int(b) for b in args.batches.split(",")]
    args.groups = set(args.groups.split(",")) - {""}
    torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else MEDIUM
    print(f"torch {torch.__version__}, {args.threads} thread(s), {'tiny' if args.tiny else 'medium'} model, "
          f"{args.resolution} px, {args.prompt_tokens} prompt tokens, LoRA r{args.rank}, fp32", flush=True)  # fmt: skip
    # A fresh inductor cache unless one is given: "first call s" is then a cold compile, as on a new machine.
    fresh = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.TemporaryDirectory(prefix="bench-inductor-")
    if fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh.name
    cases, study = build_cases(cfg, args)
    if cases:  # `--groups ""` with DIFFUSERS_EXAMPLE_SCRIPT: only the example comparison
        run_rounds(cases, args)
        report(cases, study)
    if script:
        try:
            example_vs_ours(script, cfg, args)
        except example_speed.ExampleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if fresh:
        fresh.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
