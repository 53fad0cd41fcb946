"""Peak memory and speed of one LoRA training step of the real-size Qwen-Image-2.1 transformer on a GPU.

Random weights built from the released config (no download), bf16 base, fp32 LoRA, AdamW, the trainer's
step (`train.memory_trace.training_step`: flow-matching loss through `objective`, backward, clip, optimizer step).
For each case it reports `torch.cuda.max_memory_allocated` of a steady-state step (optimizer state already
allocated), `max_memory_reserved`, seconds per step, samples/s and MFU, next to the planner's prediction when
`--plan FILE.json` gives one (from `python scripts/bench_gpu_7b.py --plan-only`, run where the planner runs).

    python scripts/bench_gpu_7b.py                       # t2i and edit, checkpointing on and off
    python scripts/bench_gpu_7b.py --targets attention+mlp --steps 5

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
import gc
import json
import functools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qwen_image_lora  # noqa: E402

if str(ROOT) not in qwen_image_lora.__path__:  # run from a plain checkout: `train/` is `qwen_image_lora.train`
    qwen_image_lora.__path__.append(str(ROOT))

from qwen_image_lora import model as qmodel  # noqa: E402
from qwen_image_lora.config import LoRAConfig  # noqa: E402
from qwen_image_lora.train import block_checkpointing, memory, memory_trace  # noqa: E402

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


def build(cfg: dict, lora: LoRAConfig):
    from diffusers import QwenImage21Transformer2DModel

    from qwen_image_lora.train.adapter import add_lora

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = QwenImage21Transformer2DModel(**cfg)
    torch.set_default_dtype(default)
    params = add_lora(transformer, lora)
    transformer.train()
    return transformer, params


def to_cuda(batch):
    from qwen_image_lora.model import PromptEmbeds

    batch.latents = batch.latents.cuda()
    batch.cond_latents = [c.cuda() for c in batch.cond_latents]
    p = batch.prompt
    batch.prompt = PromptEmbeds(p.embeds.cuda(), None if p.mask is None else p.mask.cuda(), p.image_pad.cuda())
    return batch


def run_case(transformer, params, cfg, shape, checkpoint, steps: int) -> dict:
    """`checkpoint`: True (all blocks), False (none) or a number k (blocks 0..k-1, as `auto` picks them)."""
    n = cfg["num_layers"]
    k = n if checkpoint is True else 0 if checkpoint is False else int(checkpoint)
    block_checkpointing.apply_block_checkpointing(transformer, range(k))
    batch = to_cuda(memory_trace.build_step_inputs(shape, cfg, torch.bfloat16))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    step = functools.partial(
        memory_trace.training_step, transformer, batch, optimizer, params, autocast, 1.0, torch.bfloat16
    )
    result = {"task": shape.task, "checkpointing": checkpoint}
    try:
        step()  # allocates the optimizer state; warm-up
        torch.cuda.synchronize()
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
        del step, optimizer, batch
        gc.collect()
        torch.cuda.empty_cache()
    return result


def plan_cases(args, cfg) -> list[dict]:
    out = []
    for shape in shapes(args):
        for ck in checkpoints(args):
            lora = LoRAConfig(rank=args.rank, targets=args.targets)
            layout = "all" if ck is True else "none" if ck is False else list(range(int(ck)))
            plan = memory.plan_memory(memory.PlanInputs(cfg, shape, lora, checkpoint=layout))
            out.append(
                {"task": shape.task, "checkpointing": ck, "targets": args.targets, "planned_gib": plan.peak / 2**30,
                 "plan_seconds": plan.trace_seconds}
            )  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
    return out


def shapes(args) -> list[memory.StepShape]:
    res = args.resolution
    tasks = ["t2i", "edit"] if args.task == "both" else [args.task]
    refs = {"t2i": [], "edit": [(res, res)]}
    return [memory.StepShape(res, res, args.batch_size, args.prompt_tokens, refs[t]) for t in tasks]


def checkpoints(args) -> list:
    named = {"on": [True], "off": [False], "both": [True, False]}
    if args.checkpointing in named:
        return named[args.checkpointing]
    return [int(k) for k in args.checkpointing.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["t2i", "edit", "both"], default="both")
    ap.add_argument(
        "--checkpointing", default="both", help="on | off | both | block counts k,k2 (checkpoint blocks 0..k-1)"
    )
    ap.add_argument("--targets", default="attention", help="LoRA target preset (attention, attention+mlp, all-linear)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case")
    ap.add_argument("--plan-only", action="store_true", help="print the planner's predictions (no GPU needed)")
    ap.add_argument("--plan", type=Path, help="JSON lines from --plan-only, to print next to the measurements")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    cfg = qmodel.load_transformer_config(None)
    if args.plan_only:
        results = plan_cases(args, cfg)
    else:
        planned = {}
        if args.plan and args.plan.exists():
            for line in args.plan.read_text().splitlines():
                r = json.loads(line)
                planned[(r["task"], r["checkpointing"], r["targets"])] = r["planned_gib"]
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        transformer, params = build(cfg, LoRAConfig(rank=args.rank, targets=args.targets))
        print(f"weights: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated", flush=True)
        results = []
        for shape in shapes(args):
            for ck in checkpoints(args):
                r = run_case(transformer, params, cfg, shape, ck, args.steps)
                r["targets"] = args.targets
                r["planned_gib"] = planned.get((r["task"], ck, args.targets))
                if r["planned_gib"] and "oom" not in r:
                    r["plan_error"] = r["planned_gib"] / r["max_allocated_gib"] - 1
                results.append(r)
                print(json.dumps(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
