"""Per-step time of our training loop (`LoRARecipe.train` from train/lora.py) vs a bare hand-written loop.

    python scripts/bench_trainer_overhead.py                       # tiny random model + sample data, ~1 min on 2 cores
    python scripts/bench_trainer_overhead.py --model PATH --steps 20 --rounds 4 train.mixed_precision=bf16

Both loops train the same transformer and LoRA adapter on the same batches (the recipe's own dataset, every
sample encoded before timing, each loop with its own copy of the sampler so step i gets the same batch in
both) with AdamW of the same settings and the same gradient clipping. The recipe is set up from
configs/demo.yaml (plus any `section.key=value` overrides) and runs its real `train()`: accelerate's
accumulate/backward/clip, the guards, the loss log, the LR scheduler, the progress bar. The bare loop is
what a minimal script does: forward through `model.predict_velocity`, the flow-matching loss inline,
backward, clip, step, zero_grad, `loss.item()`. They alternate in rounds of `--steps` steps; a step's time is
the wall time between the ends of consecutive steps inside a round (so per-run costs such as building the
DataLoader iterator are left out; on CUDA every step ends in a host sync in both loops). The end-of-run work
(final validation, writing the run folder) is not part of a step and is skipped.

Measured (`--control` adds a second bare loop: the noise floor). Shared 2-core CPU with other jobs running,
OMP_NUM_THREADS=1, torch 2.14.1; a third loop in the same rounds ran the recipe with the old costs patched back in:
  tiny model, defaults (batch 2, 128 px, 60 rounds of 6): recipe/bare x1.015; with the old per-step costs x1.087.
  medium model (bench_speed's; `--model`/`--data` from example_speed's folders, data.resolution=256
  train.batch_size=1 lora.rank=4 lora.alpha=4 lora.targets=attention data.cache_dir=null; 16 rounds of 4):
  x1.014; with the old costs x1.038 (the recipe's step 1.7% faster).
The old costs: `transformer.dtype` read every step (diffusers walks every module: ~1 ms on the tiny model, more
the deeper the model), the stop flag all-reduced though there is one process, a bar redraw per `set_postfix`.
What the recipe still adds (cProfile, ~1.4% on the medium model): data fetch and collate (~0.5 ms: cache keys,
captions), accelerate's optimizer wrapper (`is_lomo_available`: two importlib lookups a step), the loss log's
open/append/close (~0.3 ms), guards, progress and logging (~0.1 ms). The rest of a step is the model.
Earlier (tiny, 80 rounds of 6): H100 80GB, torch 2.11: fp32 x1.012 (bare again x1.009); bf16 x0.981.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qwen_image_lora

if str(ROOT) not in qwen_image_lora.__path__:  # run from a plain checkout: `train/` is `qwen_image_lora.train`
    qwen_image_lora.__path__.append(str(ROOT))

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import load_config
from qwen_image_lora.sample_data import make_sample_data
from qwen_image_lora.tiny_model import make_tiny_model
from qwen_image_lora.train.lora import LoRARecipe
from qwen_image_lora.train.optim import build_optimizer


def make_config(model: str | None, data: str | None, tmp: Path, overrides: list[str]):
    """configs/demo.yaml on the tiny model and the sample data (unless given), set up for timing: no validation,
    no checkpoints, a step limit that `RecipeLoop` moves."""
    if model is None:
        model = str(make_tiny_model(tmp / "tiny"))
    if data is None:
        data = str(make_sample_data(tmp / "sample-data") / "brand")
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"output_dir={tmp / 'run'}",
            f"data.cache_dir={tmp / 'cache'}",  # not the user's shared cache
            f"model.pretrained={model}",
            f"data.path={data}",
            "optim.lr=1.0e-4",  # loops may share the adapter; keep it far from the divergence guard
            "train.max_steps=1000000",
            "validation.every_steps=0",
            "validation.prompts=[]",
            "validation.edits=[]",
            "checkpoint.every_steps=1000000",
            *overrides,
        ],
    )


def make_recipe(cfg) -> LoRARecipe:
    """The real recipe, set up from `cfg`."""
    recipe = LoRARecipe(cfg)
    recipe.setup()
    recipe._finish = lambda: None  # end-of-run validation and export: not part of a training step
    return recipe


def encode_everything(recipe: LoRARecipe) -> None:
    """Fill the dataset's cache with every (item, caption) either loop can draw, so no step runs an encoder."""
    dataset = recipe.data.dataset
    for index in range(len(dataset)):
        for text in dataset.texts_for(index):
            dataset.sample(index, text)


class RecipeLoop:
    """Runs `recipe.train()` for `n` more optimizer steps, noting when each step ends (at the recipe's `_log`)."""

    def __init__(self, recipe: LoRARecipe):
        self.recipe = recipe
        self.ends: list[float] = []
        log = recipe._log

        def timed_log(*args, **kwargs):
            log(*args, **kwargs)
            self.ends.append(time.perf_counter())

        recipe._log = timed_log

    def run(self, n: int) -> list[float]:
        self.ends = []
        self.recipe.cfg.train.max_steps = self.recipe.step + n
        self.recipe.train()
        return self.ends


class BareLoop:
    """The minimal loop: same model, adapter, batches, AdamW settings and clipping; nothing else."""

    def __init__(self, recipe: LoRARecipe):
        cfg = recipe.cfg
        self.model = recipe.pipe.transformer
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device = recipe.accelerator.device
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.max_grad_norm = cfg.optim.max_grad_norm
        data = recipe.data
        sampler = copy.deepcopy(data.sampler)
        sampler.load_state_dict({"epoch": 0, "position": 0})
        loader = torch.utils.data.DataLoader(
            data.dataset, batch_sampler=sampler, collate_fn=data.collate, num_workers=0
        )
        self.batches = iter(loader)
        self.generator = torch.Generator().manual_seed(0)
        mp = cfg.train.mixed_precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)

    def step(self) -> float:
        batch = next(self.batches).to(self.device)
        x0 = batch.latents.float()
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        sigmas = torch.sigmoid(torch.randn(x0.shape[0], generator=self.generator)).to(self.device)  # logit-normal
        s = sigmas.view(-1, 1, 1, 1, 1)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            pred = qmodel.predict_velocity(
                self.model,
                (1 - s) * x0 + s * noise,
                batch.prompt,
                sigmas,
                batch.cond_latents,
            )
        loss = ((pred.float() - (noise - x0)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, n: int) -> list[float]:
        self.model.train()
        ends = []
        for _ in range(n):
            self.step()
            ends.append(time.perf_counter())
        return ends


def step_times(ends: list[float]) -> list[float]:
    """Seconds of each step after the first in a round (the first also holds the round's start-up)."""
    return [b - a for a, b in itertools.pairwise(ends)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def describe(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def alternate(loops: dict, steps: int, rounds: int, warmup: int, device) -> dict[str, list[list[float]]]:
    """Warm each loop up, then `rounds` rounds of `steps` steps of each loop, switching the order every round.
    Short rounds keep a burst of load from other processes from landing on one loop only."""
    for loop in loops.values():
        loop.run(warmup)
    sync(device)
    times = {name: [] for name in loops}
    names = list(loops)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(step_times(loops[name].run(steps)))
            sync(device)
    return times


def summarise(times: dict[str, list[list[float]]], baseline: str) -> dict[str, float]:
    """Print ms/step (median and mean over all steps) and the median over rounds of each loop's per-round median
    divided by the baseline's in the same round; return those paired ratios."""
    ratios = {}
    for name, per_round in times.items():
        flat = [t for ts in per_round for t in ts]
        paired = [statistics.median(a) / statistics.median(b) for a, b in zip(per_round, times[baseline])]
        ratios[name] = statistics.median(paired)
        print(f"  {name:<10} {statistics.median(flat) * 1e3:8.2f} ms/step median  {statistics.fmean(flat) * 1e3:8.2f} mean"
              f"  ({len(flat)} steps)   x{ratios[name]:.3f} vs {baseline} (median of per-round ratios)")  # fmt: skip
    return ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        help="local diffusers-format folder (default: a freshly built tiny model)",
    )
    p.add_argument("--data", help="data.path (default: the bundled sample data's brand set)")
    p.add_argument("--steps", type=int, default=6, help="steps per round and loop")
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument(
        "--control",
        action="store_true",
        help="also time a second bare loop: the ratio between the two bare loops is this machine's noise floor",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="config overrides on top of configs/demo.yaml, e.g. train.batch_size=1",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        recipe = make_recipe(make_config(args.model, args.data, Path(tmp), args.overrides))
        try:
            encode_everything(recipe)
            device = recipe.accelerator.device
            loops = {"bare": BareLoop(recipe), "recipe": RecipeLoop(recipe)}
            if args.control:
                loops["bare again"] = BareLoop(recipe)
            times = alternate(loops, args.steps, args.rounds, args.warmup, device)
        finally:
            recipe.cleanup()
        c = recipe.cfg
        print(f"{args.model or 'tiny (random)'} on {describe(device)}, {c.model.dtype}, mixed_precision {c.train.mixed_precision}, "
              f"batch {c.train.batch_size}, {c.data.resolution}px, LoRA r{c.lora.rank} {c.lora.targets}, "
              f"{args.rounds} alternating rounds of {args.steps} steps")  # fmt: skip
        ratios = summarise(times, "bare")
        print(f"recipe / bare: x{ratios['recipe']:.3f} (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
