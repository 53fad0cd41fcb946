"""Peak memory and speed of one LoRA training step of the real-size Qwen-Image-2.1 transformer on a GPU.

Random weights built from the released config (no download), bf16 base, fp32 LoRA, AdamW, the trainer's
step (`train.memory_trace.training_step`: flow-matching loss through `objective`, backward, clip, optimizer step).
For each case it reports `torch.cuda.max_memory_allocated` of a steady-state step (optimizer state already
allocated), `max_memory_reserved`, seconds per step, samples/s and MFU, next to the planner's prediction: from
`--plan FILE.jsonl` (written by `--plan-only` on any CPU machine), else traced on the spot, CPU minutes of GPU time.

    python scripts/bench_gpu_7b.py                       # t2i and edit, checkpointing on and off
    python scripts/bench_gpu_7b.py --targets attention+mlp --steps 5
    python scripts/bench_gpu_7b.py --compile blocks --attention flex --checkpointing on,auto

Speed (issue 16), one process; estimated (not yet run) ~9 min on an H100 when planned beforehand (planning on the GPU
machine adds ~2 min):

    python scripts/bench_gpu_7b.py --plan-only --speed > plan.jsonl            # here, CPU only
    python scripts/bench_gpu_7b.py --speed --plan plan.jsonl --out speed.json  # on the GPU
    python scripts/bench_gpu_7b.py --speed --quick --plan plan.jsonl           # ~4 min: t2i, all blocks checkpointed

`--speed`: 1024², t2i and edit (1 reference), every block checkpointed and `auto` at `--budget-gib`: eager vs
compile=blocks vs compile=blocks + flex, each a fresh transformer (dynamo's cache is kept, so "compile s" is
what the first case of a kind pays); then t2i batch 1, 2, 4 at 512² and 1024², compile=blocks, sdpa-segments vs
flex. Cases run one after another (repeats of a GPU step agree within 1%; three 7B copies do not fit in memory to
alternate). `--example` with DIFFUSERS_EXAMPLE_SCRIPT set times diffusers' example script (bf16, every block
checkpointed, cached latents, batch 1) against ours, alternating (scripts/example_speed.py); its folder holds a
random 7B transformer written to disk, so give it its own call (estimated ~8 min with `--steps 20 --rounds 1`).

`--reach` (issue 27, `reach_bench.py`): the recipe `qwen-lora plan --gpu-memory` picks for each `--budgets` size
(checkpointing, offloaded blocks, 8-bit optimizer, quantized base), t2i and edit; on a GPU each recipe loaded through
the trainer's own loader and placement, with measured peak vs plan, s/step vs the bf16 recipe (every block
checkpointed, nothing offloaded) and host-to-GPU GB per step vs plan. Prepared, not yet run on a GPU; estimated
~8 min on an H100 with the plan made beforehand (plus ~2 min to write the random 7B checkpoint once):

    python scripts/bench_gpu_7b.py --reach --plan-only > reach.jsonl           # here, CPU only
    python scripts/bench_gpu_7b.py --reach --plan reach.jsonl --out reach.json # on the GPU: 8, 12, 16, 24 GB

MFU counts model FLOPs per step = 3 x forward FLOPs (the usual 6*N*T convention, as if weights were trained;
recomputation by checkpointing is not counted), forward FLOPs = 2 * (linear weights each token passes through)
* tokens + 4 * d_model * (query-key pairs attended) per block, against the GPU's dense bf16 peak.

Measured on an H100 80GB HBM3 (torch 2.11, diffusers 0.42.1, no torch.compile), 1024x1024, 256 prompt tokens,
LoRA r32, AdamW; planned = `qwen-lora plan` on CPU (torch 2.14). GiB of max_memory_allocated:

    targets        task      batch  checkpointed  planned  measured  s/step  samples/s  MFU
    attention      t2i       1      32/32         16.22    16.23     0.635   1.57       33%
    attention      t2i       1      26/32         21.28    21.29     0.606   1.65       35%
    attention      t2i       1      16/32         31.27    31.28     0.550   1.82       39%
    attention      t2i       1      0/32          47.15    47.16     0.452   2.21       47%
    attention      edit (1)  1      32/32         18.61    18.62     1.285   0.78       34%
    attention      edit (1)  1      0/32          78.66    OOM (79.2 GiB card)
    attention      t2i       2      32/32         18.75    18.76     1.316   1.52       32%
    attention      edit (1)  2      32/32         23.53    23.54     2.823   0.71       31%
    attention+mlp  t2i       1      32/32         17.22    17.24     0.733   1.36       29%
    attention+mlp  t2i       1      0/32          53.41    53.43     0.522   1.92       41%
    attention+mlp  edit (1)  1      32/32         20.02    20.03     1.458   0.69       30%
    attention+mlp  edit (1)  1      0/32          90.19    OOM
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qwen_image_lora

if str(ROOT) not in qwen_image_lora.__path__:  # run from a plain checkout: `train/` is `qwen_image_lora.train`
    qwen_image_lora.__path__.append(str(ROOT))

import example_speed  # scripts/, next to this file (the script directory is on sys.path)
import reach_bench
from diffusers import QwenImage21Transformer2DModel

from qwen_image_lora import model as qmodel
from qwen_image_lora import speed
from qwen_image_lora.config import LoRAConfig, OptimConfig
from qwen_image_lora.model import PromptEmbeds
from qwen_image_lora.train import block_checkpointing, memory, memory_fit, memory_trace
from qwen_image_lora.train.adapter import add_lora
from qwen_image_lora.train.optim import build_optimizer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops(cfg: dict, shape: memory.StepShape) -> float:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = d * cfg["mlp_ratio"]
    th, tw = shape.latent_grid(shape.height, shape.width)
    n_target = th * tw
    n_cond = sum(h * w for h, w in (shape.latent_grid(*r) for r in shape.references))
    text = shape.prompt_tokens
    seq = text + n_cond + n_target
    per_token_block = 4 * d * d + 3 * d * mlp  # q, k, v, out + SwiGLU
    linear = cfg["num_layers"] * per_token_block * seq
    linear += text * (cfg["context_in_dim"] * d + d * d) + (n_cond + n_target) * cfg["in_channels"] * d + seq * d * 64
    # Block-causal attention: text is causal, each image block sees everything before it and itself, the target
    # sees the whole sequence.
    pairs = text * text / 2 + n_cond * (text + n_cond) + n_target * seq
    attention = cfg["num_layers"] * 2 * d * pairs  # QK^T and PV, 2 FLOPs per multiply-add each
    return 2 * linear + 2 * attention


VARIANTS = {"eager": ("sdpa-segments", False), "blocks": ("sdpa-segments", "blocks"), "blocks+flex": ("flex", "blocks")}


def build(cfg: dict, lora: LoRAConfig, blocks=None, attention="sdpa-segments", compile=False):
    """The random-weight transformer with LoRA, then (as the trainer orders them) checkpointing of `blocks` when
    given and the speed switches through `speed.configure_transformer`."""

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = QwenImage21Transformer2DModel(**cfg)
    torch.set_default_dtype(default)
    params = add_lora(transformer, lora)
    transformer.train()
    if blocks is not None:
        block_checkpointing.apply_block_checkpointing(transformer, blocks)
    speed.configure_transformer(transformer, attention=attention, compile=compile)
    return transformer, params


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def to_cuda(batch):

    batch.latents = batch.latents.cuda()
    batch.cond_latents = [c.cuda() for c in batch.cond_latents]
    p = batch.prompt
    batch.prompt = PromptEmbeds(p.embeds.cuda(), None if p.mask is None else p.mask.cuda(), p.image_pad.cuda())
    return batch


def bf16_step(transformer, params, cfg, shape):
    """One training step on a random batch of `shape`, as the trainer runs it: bf16 autocast, clipping 1.0, the
    trainer's AdamW."""
    batch = to_cuda(memory_trace.build_step_inputs(shape, cfg, torch.bfloat16))
    optimizer = build_optimizer(params, OptimConfig(lr=1e-4))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    return functools.partial(
        memory_trace.training_step, transformer, batch, optimizer, params, autocast, 1.0, torch.bfloat16
    )


def run_case(transformer, params, cfg, shape, checkpoint, steps: int) -> dict:
    """`checkpoint`: True (all blocks), False (none) or a number k (blocks 0..k-1, as `auto` picks them); left as
    it is when the transformer already checkpoints those blocks (a compiled one would recompile)."""
    n = cfg["num_layers"]
    k = n if checkpoint is True else 0 if checkpoint is False else int(checkpoint)
    if block_checkpointing.checkpointed_blocks(transformer) != list(range(k)):
        block_checkpointing.apply_block_checkpointing(transformer, range(k))
    step = bf16_step(transformer, params, cfg, shape)
    result = {"task": shape.task, "checkpointing": checkpoint, "batch": shape.batch_size, "resolution": shape.height}
    try:
        start = time.perf_counter()
        step()  # allocates the optimizer state; warm-up (and the compile, when compiled)
        torch.cuda.synchronize()
        result["first_call_s"] = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        result["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        sec = (time.perf_counter() - start) / steps
        flops = 3 * forward_flops(cfg, shape) * shape.batch_size
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
        result.update(
            s_per_step=sec,
            samples_per_s=shape.batch_size / sec,
            model_tflops_per_step=flops / 1e12,
            mfu=flops / sec / (peak * 1e12),
        )
    except torch.OutOfMemoryError as e:
        result["oom"] = str(e).splitlines()[0][:200]
        result["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        for p in params:
            p.grad = None
        del step  # and with it the batch and the optimizer state it holds
        free_cuda()
    return result


def plan_key(task: str, checkpoint, targets: str, batch: int, resolution: int) -> str:
    return f"{task}|{checkpoint}|{targets}|b{batch}|{resolution}"


def plan_case(args, cfg, shape, ck) -> dict:
    """The planner's peak for one case; for `auto`, the blocks it checkpoints at `--budget-gib` as well."""
    lora = LoRAConfig(rank=args.rank, targets=args.targets)
    inputs = memory.PlanInputs(cfg, shape, lora, checkpoint="all")
    row = {"task": shape.task, "checkpointing": ck, "targets": args.targets, "batch": shape.batch_size,
           "resolution": shape.height}  # fmt: skip
    if ck == "auto":
        row["auto_blocks"] = len(memory_fit.blocks_for_gpu(inputs, int(args.budget_gib * 2**30)))
        ck = row["auto_blocks"]
    inputs.checkpoint = "all" if ck is True else "none" if ck is False else list(range(int(ck)))
    plan = memory.plan_memory(inputs)
    return {**row, "planned_gib": plan.peak / 2**30, "plan_seconds": plan.trace_seconds}


def shapes(args, resolution=None, batch=None, bucket=None) -> list[memory.StepShape]:
    res = resolution or args.resolution
    h, w = bucket or (res, res)
    tasks = ["t2i", "edit"] if args.task == "both" else [args.task]
    refs = {"t2i": [], "edit": [(h, w)]}
    return [memory.StepShape(h, w, batch or args.batch_size, args.prompt_tokens, refs[t]) for t in tasks]


def checkpoints(args) -> list:
    named = {"on": [True], "off": [False], "both": [True, False], "auto": ["auto"]}
    if args.checkpointing in named:
        return named[args.checkpointing]
    return [named[k][0] if k in named else int(k) for k in args.checkpointing.split(",")]


def speed_cases(args) -> list[tuple[memory.StepShape, object, list[str]]]:
    """(shape, checkpointing, variants) of `--speed`: the variant study, then the batch study."""
    out = []
    for shape in shapes(args):
        for ck in checkpoints(args):
            out.append((shape, ck, list(VARIANTS)))
    for res in args.batch_resolutions:
        for b in args.batches:
            shape = memory.StepShape(res, res, b, args.prompt_tokens, [])
            out.append((shape, True, ["blocks", "blocks+flex"]))
    return out


def case_plan(args, cfg, shape, ck, planned: dict) -> tuple[dict, object]:
    """The case's plan row (from `--plan`, else traced here: CPU minutes on the GPU machine) and its checkpointing
    with `auto` resolved to the planner's block count."""
    key = plan_key(shape.task, ck, args.targets, shape.batch_size, shape.height)
    plan = planned.get(key) or plan_case(args, cfg, shape, ck)
    return plan, plan.get("auto_blocks", ck)


def measure(args, cfg, shape, ck, variant, planned) -> dict:
    plan, k = case_plan(args, cfg, shape, ck, planned)
    n = cfg["num_layers"]
    blocks = range(n if k is True else 0 if k is False else int(k))
    attention, compile = VARIANTS[variant]
    transformer, params = build(cfg, LoRAConfig(rank=args.rank, targets=args.targets), blocks, attention, compile)
    r = run_case(transformer, params, cfg, shape, k, args.steps)
    del transformer, params  # before the next case builds its own 7B copy
    free_cuda()
    r.update(variant=variant, checkpointing=ck, checkpointed_blocks=len(blocks), targets=args.targets,
             planned_gib=plan["planned_gib"])  # fmt: skip
    if "oom" not in r:
        r["plan_error"] = plan["planned_gib"] / r["max_allocated_gib"] - 1
        r["compile_s"] = r["first_call_s"] - r["s_per_step"]
    return r


def print_speed_table(results: list[dict]) -> None:
    base = {(r["task"], r["checkpointing"], r["batch"], r["resolution"]): r for r in results if r["variant"] == "eager"}
    print("\n| task | res | batch | ckpt blocks | variant | s/step | samples/s | MFU | x eager speed | peak GiB | planned "
          "| compile s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "oom" in r:
            print(f"| {r['task']} | {r['resolution']} | {r['batch']} | {r['checkpointed_blocks']} | {r['variant']} "
                  f"| OOM | | | | {r['max_allocated_gib']:.2f} | {r['planned_gib']:.2f} | |")  # fmt: skip
            continue
        b = base.get((r["task"], r["checkpointing"], r["batch"], r["resolution"]))
        speedup = f"{b['s_per_step'] / r['s_per_step']:.2f}" if b and "s_per_step" in b else "-"
        print(f"| {r['task']} | {r['resolution']} | {r['batch']} | {r['checkpointed_blocks']} | {r['variant']} | "
              f"{r['s_per_step']:.3f} | {r['samples_per_s']:.2f} | {r['mfu']:.0%} | {speedup} | "
              f"{r['max_allocated_gib']:.2f} | {r['planned_gib']:.2f} | {r['compile_s']:.0f} |")  # fmt: skip


def example_vs_ours(args, cfg, script: Path) -> dict:
    """diffusers' example script (a subprocess on a random 7B folder) vs our eager and compiled+flex steps: t2i,
    every block checkpointed, bf16, r = --rank on attention with alpha = rank, batch 1."""

    def make_ours(prompt_tokens: int) -> dict:
        shape = memory.StepShape(args.resolution, args.resolution, 1, prompt_tokens, [])
        ours = {}
        for variant in ("eager", "blocks+flex"):
            lora = LoRAConfig(rank=args.rank, alpha=float(args.rank), targets="attention")
            transformer, params = build(cfg, lora, range(cfg["num_layers"]), *VARIANTS[variant])
            ours[f"ours {variant}"] = bf16_step(transformer, params, cfg, shape)
            ours[f"ours {variant}"]()  # the compile, outside the timing
        return ours

    return example_speed.run_comparison(
        script, make_ours, transformer=None, resolution=args.resolution, rank=args.rank, mixed_precision="bf16",
        threads=None, extra=["--gradient_checkpointing"], steps=args.steps, rounds=args.rounds, target=1 / 1.3,
    )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["t2i", "edit", "both"], default="both")
    ap.add_argument("--checkpointing", default=None,
                    help="on | off | both | auto | block counts k,k2 (checkpoint blocks 0..k-1), comma-separated; "
                         "default both (--speed: on,auto)")  # fmt: skip
    ap.add_argument("--targets", default="attention", help="LoRA target preset (attention, attention+mlp, all-linear)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case")
    ap.add_argument("--attention", choices=speed.ATTENTION_PATHS, default="sdpa-segments")
    ap.add_argument("--compile", choices=["false", "blocks", "full"], default="false")
    ap.add_argument(
        "--budget-gib", type=float, default=80.0, help="GPU memory `auto` plans for (train.memory_budget_gb)"
    )
    ap.add_argument("--speed", action="store_true", help="eager vs compiled vs compiled+flex, and the batch study")
    ap.add_argument("--quick", action="store_true", help="--speed on t2i with every block checkpointed only")
    ap.add_argument("--batches", default="1,2,4", help="batch sizes of the --speed batch study")
    ap.add_argument("--example", action="store_true", help="time DIFFUSERS_EXAMPLE_SCRIPT against our steps")
    ap.add_argument("--rounds", type=int, default=2, help="--example: alternating rounds")
    ap.add_argument("--plan-only", action="store_true", help="print the planner's predictions (no GPU needed)")
    ap.add_argument("--plan", type=Path, help="JSON lines from --plan-only, to print next to the measurements")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument(
        "--reach",
        action="store_true",
        help="the recipe `qwen-lora plan` picks for each --budgets size, planned or measured (reach_bench.py)",
    )
    ap.add_argument("--budgets", default="8,12,16,24", help="--reach: GPU sizes in GiB")
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=ROOT / ".cache" / "qwen-image-2.1-7b-random",
        help="--reach: the random 7B checkpoint, written once (~14 GB)",
    )
    args = ap.parse_args(argv)
    if args.reach:  # at the bucket `qwen-lora plan` plans for
        return reach_bench.run(args, shapes(args, bucket=reach_bench.planned_bucket(args.resolution)), to_cuda)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.batch_resolutions = [512, 1024]
    if args.quick:
        args.task, args.checkpointing, args.batch_resolutions = "t2i", args.checkpointing or "on", [1024]
    args.checkpointing = args.checkpointing or ("on,auto" if args.speed else "both")
    compile = False if args.compile == "false" else args.compile
    cfg = qmodel.load_transformer_config(None)
    script = None
    if args.example:
        try:
            script = example_speed.check_script(os.environ.get("DIFFUSERS_EXAMPLE_SCRIPT"))
        except example_speed.ExampleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    cases = speed_cases(args) if args.speed else [(s, ck, None) for s in shapes(args) for ck in checkpoints(args)]
    if args.plan_only:
        results, seen = [], set()
        for shape, ck, _ in cases:
            key = plan_key(shape.task, ck, args.targets, shape.batch_size, shape.height)
            if key not in seen:
                seen.add(key)
                results.append(plan_case(args, cfg, shape, ck))
                print(json.dumps(results[-1]), flush=True)
    elif script:
        results = example_vs_ours(args, cfg, script)
    else:
        planned = {}
        if args.plan and args.plan.exists():
            for line in args.plan.read_text().splitlines():
                r = json.loads(line)
                planned[plan_key(r["task"], r["checkpointing"], r["targets"], r.get("batch", 1),
                                 r.get("resolution", 1024))] = r  # fmt: skip
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        results = []
        if args.speed:
            for shape, ck, variants in cases:
                for variant in variants:
                    results.append(measure(args, cfg, shape, ck, variant, planned))
                    print(json.dumps(results[-1]), flush=True)
            print_speed_table(results)
        else:
            transformer, params = build(
                cfg, LoRAConfig(rank=args.rank, targets=args.targets), None, args.attention, compile
            )
            print(f"weights: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated", flush=True)
            for shape, ck, _ in cases:
                plan, k = case_plan(args, cfg, shape, ck, planned)
                r = run_case(transformer, params, cfg, shape, k, args.steps)
                r.update(targets=args.targets, checkpointing=ck, planned_gib=plan["planned_gib"])
                if "oom" not in r:
                    r["plan_error"] = r["planned_gib"] / r["max_allocated_gib"] - 1
                results.append(r)
                print(json.dumps(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
