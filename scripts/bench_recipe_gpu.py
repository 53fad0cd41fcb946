"""Our real recipe (`train/lora.py`'s LoRARecipe, data cache, encoder offloading and all) on the 7B transformer shape.

    python scripts/bench_recipe_gpu.py [--model DIR] [--steps 8] [--edit] [key=value ...]

Builds (once) a checkpoint whose transformer has the real 7B config with random weights and tiny encoders
(nothing is downloaded), prepares the cache, trains a few steps at 1024² and prints peak GPU memory
(torch.cuda.max_memory_allocated: the figure `qwen-lora plan` predicts) and seconds per step after the first.
Needs a CUDA GPU with ~20 GB free and ~30 GB of disk for the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from qwen_image_lora.config import load_config
from qwen_image_lora.data.prepare import prepare
from qwen_image_lora.sample_data import make_sample_data
from qwen_image_lora.tiny_model import make_tiny_model
from qwen_image_lora.train.lora import LoRARecipe

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / ".cache" / "qwen-image-2.1-7b-random"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--edit", action="store_true", help="train on the edit pairs (one reference image)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_recipe_gpu: needs a CUDA GPU")
    logging.basicConfig(level=logging.WARNING)
    t = time.perf_counter()
    model = make_tiny_model(args.model, full_transformer=True)
    print(f"checkpoint ready in {time.perf_counter() - t:.0f} s: {model}")
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        data = make_sample_data(Path(tmp) / "data")
        overrides = [
            f"model.pretrained={model}", "model.dtype=bfloat16", f"output_dir={tmp}/run", f"data.cache_dir={tmp}/cache",
            f"data.path={data / ('edits/manifest.jsonl' if args.edit else 'brand')}",
            "data.resolution=1024", "data.max_upscale=8", "data.caption_dropout=0",  # small samples -> 1024² buckets
            "train.batch_size=1", "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
            f"train.max_steps={args.steps}", "checkpoint.every_steps=100000", "validation.every_steps=0",
            "validation.prompts=[]", "validation.edits=[]", "validation.held_out_fraction=0", "tracking.backend=none",
            "lora.rank=32", "lora.alpha=32", *args.overrides,
        ]  # fmt: skip
        cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
        prepare(cfg)
        recipe = LoRARecipe(cfg)
        recipe.setup()
        torch.cuda.synchronize()
        start = time.perf_counter()
        recipe.train()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        recipe.cleanup()
        peak = torch.cuda.max_memory_allocated() / 2**30
        losses = [json.loads(line)["loss"] for line in (Path(tmp) / "run" / "losses.jsonl").read_text().splitlines()]
    print(
        f"{'edit (1 reference)' if args.edit else 't2i'} 1024², batch 1, LoRA r32 attention, AdamW, bf16, checkpointing"
    )
    print(
        f"peak allocated {peak:.2f} GiB (whole run, encoders offloaded); {seconds / len(losses):.3f} s/step "
        f"over {len(losses)} steps incl. the first and the adapter save; losses {losses[0]:.3f} .. {losses[-1]:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
