"""Per-image time: base model vs one LoRA unfused vs the same LoRA fused, measured in one run on one machine.

    python scripts/bench_inference.py                                  # tiny random model, CPU, a random LoRA
    python scripts/bench_inference.py --model Qwen/Qwen-Image-2.1 --lora outputs/brand --steps 40 --resolution 1024

Ratios are against the base model in the same run; absolute times depend on the machine (say which one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwen_image_lora.inference.generator import GenerationRequest, Generator
from qwen_image_lora.inference.testing import make_random_lora
from qwen_image_lora.tiny_model import make_tiny_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hub id or local folder (default: a freshly built tiny model)")
    p.add_argument("--lora", help="adapter to time (default: a random rank-16 LoRA on the attention projections)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--resolution", type=int, default=None, help="default: 1024 for --model, 128 for the tiny model")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    tmp = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    model = args.model
    if model is None:
        model = str(make_tiny_model(tmp / "tiny"))
    resolution = args.resolution or (1024 if args.model else 128)
    gen = Generator.from_pretrained(model, dtype, device, resolution=resolution)
    lora = args.lora or make_random_lora(gen.pipe.transformer, tmp / "lora", rank=16, seed=0)
    name = gen.adapters.load(lora)

    def per_image(adapters) -> float:
        request = GenerationRequest(
            "a product photo of a bottle", num_inference_steps=args.steps, seed=0, adapters=adapters
        )
        for _ in range(args.warmup):
            gen.generate(request)
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            gen.generate(request)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    results = {"base": per_image({}), "lora unfused": per_image({name: 1.0})}
    gen.adapters.fuse({name: 1.0})
    results["lora fused"] = per_image({name: 1.0})
    gen.adapters.unfuse()
    results["base again"] = per_image({})

    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model or 'tiny (random)'} on {device_name}, {dtype}, {resolution}px budget, {args.steps} steps, "
          f"median of {args.repeats}")  # fmt: skip
    base = results["base"]
    for label, seconds in results.items():
        print(f"  {label:<13} {seconds * 1000:9.1f} ms/image   x{seconds / base:.3f} vs base")
    return 0


if __name__ == "__main__":
    sys.exit(main())
