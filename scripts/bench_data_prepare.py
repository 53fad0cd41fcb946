"""Benchmark `data prepare` on the tiny model: throughput, and peak RAM at two data-set sizes (it should be flat:
the cache is written in bounded shards and read through memory maps), and throughput at each
`data.prepare_batch_size` (items/s and the ratio to batch size 1, in one run, alternating on each repeat).

    python scripts/bench_data_prepare.py [--sizes 200 2000] [--resolution 64] [--batch-sizes 1 4 16] [--repeats 1] [--threads 1]

Each size and batch size runs in a fresh subprocess on a fresh cache, which runs the doctor (timed apart: it reads
every file whatever the batch size), prepares the cache and then reads every entry back; peak RSS comes from
resource.getrusage (ru_maxrss), the Python-heap peak of the read-back from tracemalloc (tracing the prepare loop
itself would slow it several-fold). With --repeats the best of the repeats counts for each batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from qwen_image_lora.tiny_model import make_tiny_model

CHILD = r"""
import json, os, resource, sys, time, tracemalloc
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS") or torch.get_num_threads()))
from qwen_image_lora.config import load_config
from qwen_image_lora.data.cache import Cache, model_identity
from qwen_image_lora.data.doctor import diagnose
from qwen_image_lora.data.prepare import prepare
from qwen_image_lora.model import load_pipeline

cfg = load_config(None, sys.argv[1:])
pipe = load_pipeline(cfg.model.pretrained, "float32")
t = time.perf_counter()
report = diagnose(cfg, contact_sheet=False)
doctor_s = time.perf_counter() - t
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
stats = prepare(cfg, pipe, report=report, progress=False, log=lambda *_: None)
prep_s = time.perf_counter() - t
after_prepare = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
cache = Cache(cfg.data.cache_dir, model_identity(cfg.model))
t = time.perf_counter()
n = 0
for key in cache.keys():
    cache.get(key); n += 1
read_s = time.perf_counter() - t
_, heap_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print(json.dumps({"items": stats.items, "encoded": stats.latents_encoded + stats.prompts_encoded, "prepare_s": prep_s,
                  "doctor_s": doctor_s, "batch_size": cfg.data.prepare_batch_size,
                  "read_entries": n, "read_s": read_s, "rss_after_load_mb": base / 1024,
                  "rss_peak_prepare_mb": after_prepare / 1024, "rss_peak_read_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "heap_peak_read_mb": heap_peak / 2**20}))
"""


def make_images(folder: Path, n: int, side: int) -> None:

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side + 16 * (i % 3), side), Image.Resampling.BICUBIC).save(
            folder / f"{i:05d}.png"
        )
        (folder / f"{i:05d}.txt").write_text(f"a qwnbrand product photo, variant {i}")


def run_child(overrides: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *overrides], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--side", type=int, default=32, help="image height in px (widths vary up to +32)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="data.prepare_batch_size values to compare")
    ap.add_argument("--repeats", type=int, default=1, help="runs per batch size, alternating; the fastest counts")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a busy CPU"
    )
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", BENCH_THREADS=str(args.threads or ""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        model = make_tiny_model(tmp / "tiny")
        rows = []
        for n in args.sizes:
            make_images(tmp / f"data{n}", n, args.side)
            best: dict[int, dict] = {}
            for rep in range(args.repeats):
                for bs in args.batch_sizes:
                    out = tmp / f"out{n}-b{bs}-{rep}"
                    overrides = [
                        f"data.path={tmp / f'data{n}'}",
                        f"model.pretrained={model}",
                        "model.dtype=float32",
                        f"data.resolution={args.resolution}",
                        "data.min_side=16",
                        f"output_dir={out}",
                        f"data.cache_dir={out}/cache",  # each measurement from an empty cache, not the shared one
                        f"data.prepare_batch_size={bs}",
                    ]
                    row = run_child(overrides, env)
                    if bs not in best or row["prepare_s"] < best[bs]["prepare_s"]:
                        best[bs] = row
            for bs, row in best.items():
                print(
                    f"{n:>6} items, batch {bs:>2}: doctor {row['doctor_s']:5.1f}s + prepare {row['prepare_s']:6.1f}s "
                    f"({row['items'] / row['prepare_s']:6.1f} items/s, x{best[args.batch_sizes[0]]['prepare_s'] / row['prepare_s']:.2f} "
                    f"vs batch {args.batch_sizes[0]}, {row['encoded']} encodes) | read {row['read_entries']} entries in "
                    f"{row['read_s']:.2f}s | peak RSS {row['rss_after_load_mb']:.0f} MB after load -> "
                    f"{row['rss_peak_prepare_mb']:.0f} MB prepare -> {row['rss_peak_read_mb']:.0f} MB read | "
                    f"Python heap peak reading {row['heap_peak_read_mb']:.1f} MB",
                    flush=True,
                )
            rows.append(best[args.batch_sizes[0]])
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            growth = (b["rss_peak_read_mb"] - b["rss_after_load_mb"]) - (a["rss_peak_read_mb"] - a["rss_after_load_mb"])
            print(
                f"peak RSS growth from {a['items']} to {b['items']} items (beyond the loaded model): {growth:+.0f} MB"
            )


if __name__ == "__main__":
    main()
