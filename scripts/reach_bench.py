"""The reach study of `bench_gpu_7b.py --reach` (issue 27): for each GPU size, the recipe `qwen-lora plan` picks for
the real-size transformer (checkpointing, offloaded blocks, 8-bit optimizer, quantized base), and, on a GPU, that
recipe measured: peak allocated vs planned, s/step vs the bf16 recipe (every block checkpointed, nothing offloaded,
AdamW), host-to-GPU bytes per step vs planned.

    python scripts/bench_gpu_7b.py --reach --plan-only --budgets 8,12,16,24,40,80 > reach.jsonl   # CPU, ~10 min
    python scripts/bench_gpu_7b.py --reach --plan reach.jsonl --out reach.json                    # on the GPU

On the GPU each recipe loads the random 7B transformer through the trainer's own loader (`model.load_transformer`:
diffusers' quantization backends), adds LoRA, and is placed by `memory_fit.apply`'s pieces (checkpointing, then
`offload.place_transformer`), so what is measured is what `train/lora.py` runs. The checkpoint folder is written
once (`make_tiny_model(..., full_transformer=True)`, ~14 GB). A GPU larger than the budget measures the budget's
recipe; the peak is what the smaller card would need (the CUDA context and fragmentation margin are the plan's).
"""

from __future__ import annotations

import functools
import gc
import json
import sys
import time
from pathlib import Path

import torch

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import DataConfig, LoRAConfig, OptimConfig
from qwen_image_lora.tiny_model import make_tiny_model
from qwen_image_lora.train import memory, memory_fit, memory_trace, offload
from qwen_image_lora.train.adapter import add_lora
from qwen_image_lora.train.block_checkpointing import apply_block_checkpointing
from qwen_image_lora.train.optim import build_optimizer

GiB = 2**30


def plan_rows(cfg: dict, shapes: list[memory.StepShape], budgets: list[float], lora: LoRAConfig) -> list[dict]:
    """One row per (budget, task): the recipe and its plan, with the bf16 recipe's plan for reference."""
    rows = []
    for shape in shapes:
        traced = {}

        def planner(i: memory.PlanInputs) -> memory.MemoryPlan:  # one trace per layout across the budgets
            key = (i.num_layers, i.checkpoint if isinstance(i.checkpoint, str) else tuple(i.checkpoint), i.quantize)
            if key not in traced:
                traced[key] = memory.plan_memory(i)
            return traced[key]

        for gib in budgets:
            start = time.perf_counter()
            inputs = memory.PlanInputs(cfg, shape, lora, checkpoint="all")
            recipe = memory_fit.fit(inputs, int(gib * GiB), planner=planner)
            p = recipe.plan
            rows.append({
                "budget_gib": gib, "task": shape.task, "references": len(shape.references), "fits": recipe.fits,
                "recipe": recipe.describe(), "overrides": recipe.overrides(), "checkpointed": p.checkpointed,
                "offload_blocks": p.offloaded, "optimizer": p.inputs.optimizer, "quantize": p.inputs.quantize,
                "planned_gib": p.peak / GiB, "needed_gib": p.total / GiB, "host_gb_per_step": p.host_bytes_per_step / 1e9,
                "host_s_per_step_at_25GBps": recipe.host_seconds_per_step, "plan_seconds": time.perf_counter() - start,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The README's reach table."""
    out = [
        "| GPU | task | recipe | planned peak | needed | host link per step (at 25 GB/s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        host = (
            f"{r['host_gb_per_step']:.1f} GB (+{r['host_s_per_step_at_25GBps']:.2f} s)" if r["offload_blocks"] else "-"
        )
        recipe = r["recipe"] if r["fits"] else f"does not fit ({r['recipe']})"
        out.append(
            f"| {r['budget_gib']:g} GB | {r['task']} | {recipe} | {r['planned_gib']:.1f} GiB "
            f"| {r['needed_gib']:.1f} GiB | {host} |"
        )
    return "\n".join(out)


def measure_rows(
    rows: list[dict], folder: Path, cfg: dict, lora: LoRAConfig, prompt_tokens: int, steps: int, to_cuda
) -> list[dict]:
    """Each planned row on this GPU, after the bf16 recipe of its task (the speed reference). `to_cuda` moves a
    `memory_trace.build_step_inputs` batch to the GPU."""
    results, reference = [], {}
    for row in rows:
        shape = _shape(row, prompt_tokens)
        if row["task"] not in reference:
            base = {"checkpointed": list(range(cfg["num_layers"])), "offload_blocks": 0, "optimizer": "adamw",
                    "quantize": "none"}  # fmt: skip
            reference[row["task"]] = measure_recipe(base, folder, cfg, shape, lora, steps, to_cuda)
            print(json.dumps({"task": row["task"], "bf16 recipe": reference[row["task"]]}), flush=True)
        if not row["fits"]:
            continue
        r = {**row, **measure_recipe(row, folder, cfg, shape, lora, steps, to_cuda)}
        ref = reference[row["task"]]
        if "s_per_step" in r and "s_per_step" in ref:
            r["x_bf16_recipe_time"] = r["s_per_step"] / ref["s_per_step"]
            r["plan_error"] = r["planned_gib"] / r["max_allocated_gib"] - 1
        results.append(r)
        print(json.dumps(r), flush=True)
    return results


def measure_recipe(
    row: dict, folder: Path, cfg: dict, shape: memory.StepShape, lora: LoRAConfig, steps: int, to_cuda
) -> dict:
    """Load, adapt, checkpoint and place the transformer as the recipe says; time `steps` steady-state steps."""
    torch.manual_seed(0)
    transformer = qmodel.load_transformer(str(folder), torch.bfloat16, row["quantize"])
    params = add_lora(transformer, lora)
    transformer.train()
    n, k = cfg["num_layers"], row["offload_blocks"]
    if len(row["checkpointed"]) >= n:
        transformer.enable_gradient_checkpointing()
    else:
        apply_block_checkpointing(transformer, row["checkpointed"])
    offloader = offload.place_transformer(transformer, torch.device("cuda"), range(k))
    optimizer = build_optimizer(params, OptimConfig(name=row["optimizer"], lr=1e-4))
    batch = to_cuda(memory_trace.build_step_inputs(shape, cfg, torch.bfloat16))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    step = functools.partial(
        memory_trace.training_step, transformer, batch, optimizer, params, autocast, 1.0, torch.bfloat16
    )
    out = {}
    try:
        step()  # allocates the optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        moved = offloader.bytes_moved if offloader else 0
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        out["s_per_step"] = (time.perf_counter() - start) / steps
        out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        out["max_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        out["measured_host_gb_per_step"] = ((offloader.bytes_moved if offloader else 0) - moved) / steps / 1e9
    except torch.OutOfMemoryError as e:
        out["oom"] = str(e).splitlines()[0][:200]
    finally:
        del step, transformer, params, optimizer, batch, offloader
        gc.collect()
        torch.cuda.empty_cache()
    return out


def planned_bucket(resolution: int) -> tuple[int, int]:
    """(height, width) `qwen-lora plan` plans a config at: its largest bucket at the default data.max_aspect."""
    return memory.largest_bucket(resolution, DataConfig().max_aspect)


def _shape(row: dict, prompt_tokens: int, resolution: int = 1024) -> memory.StepShape:
    h, w = planned_bucket(resolution)
    return memory.StepShape(h, w, 1, prompt_tokens, [(h, w)] * row["references"])


def run(args, shapes: list[memory.StepShape], to_cuda) -> int:
    """`bench_gpu_7b.py --reach`: plan (`--plan-only`, CPU) or measure (GPU) the recipes for each `--budgets` size
    and each of `shapes` (t2i and edit); `to_cuda` moves a step batch to the GPU."""
    cfg = qmodel.load_transformer_config(None)
    lora = LoRAConfig(rank=args.rank, targets=args.targets)
    budgets = [float(b) for b in args.budgets.split(",")]
    planned = [json.loads(line) for line in args.plan.read_text().splitlines()] if args.plan else []
    rows = [r for r in planned if "budget_gib" in r and r["budget_gib"] in budgets]
    if args.plan_only or not rows:
        rows = plan_rows(cfg, shapes, budgets, lora)
        print(markdown(rows), file=sys.stderr)
    if args.plan_only:
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    folder = make_tiny_model(args.model_dir, full_transformer=True)
    results = measure_rows(rows, folder, cfg, lora, args.prompt_tokens, args.steps, to_cuda)
    print(
        "\n| GPU | task | recipe | planned GiB | measured GiB | s/step | x bf16 recipe | host GB/step planned / measured |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        measured = "OOM" if "oom" in r else f"{r['max_allocated_gib']:.2f}"
        speed = (
            f"{r['s_per_step']:.3f} | {r.get('x_bf16_recipe_time', float('nan')):.2f}" if "s_per_step" in r else " | "
        )
        print(
            f"| {r['budget_gib']:g} | {r['task']} | {r['recipe']} | {r['planned_gib']:.2f} | {measured} | {speed} | "
            f"{r['host_gb_per_step']:.1f} / {r.get('measured_host_gb_per_step', float('nan')):.1f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0
