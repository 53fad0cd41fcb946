"""The run's output folder and other adapter layouts.

    <output_dir>/pytorch_lora_weights.safetensors   diffusers format: `transformer.`-prefixed peft keys, the peft
                                                     config in the header; `QwenImage21Pipeline.load_lora_weights`
                                                     loads it unchanged
    <output_dir>/config.yaml                        the resolved config
    <output_dir>/training_metadata.json             steps, losses, timings, versions
    <output_dir>/README.md                          model card: base model, trigger word, settings, samples

Other layouts (`qwen-lora export --format comfyui`) are written by `qwen_image_lora.adapter_format`, the one home
of adapter layouts.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import accelerate
import diffusers
import peft
import torch

from qwen_image_lora import model as qmodel
from qwen_image_lora import run_layout as layout
from qwen_image_lora.config import Config, save_config
from qwen_image_lora.console import counted
from qwen_image_lora.hub import is_hub_id
from qwen_image_lora.io import atomic_path, atomic_write_text, content_hash
from qwen_image_lora.train import adapter as lora_adapter


def write_adapter_atomically(transformer, output_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """`pytorch_lora_weights.safetensors` in `output_dir`, replaced in one rename, with the user's umask (safetensors
    writes 0600: a ComfyUI server or a teammate running as another user could not read the run's adapter)."""
    final = Path(output_dir) / layout.FINAL_ADAPTER
    with atomic_path(final) as tmp, tempfile.TemporaryDirectory(prefix=".adapter.", dir=tmp.parent) as folder:
        lora_adapter.save_adapter(transformer, folder, state).replace(tmp)
    return final


LOSS_WINDOW = 10  # steps averaged at each end of a run's loss curve


def run_metadata(run_id: str, steps: int, losses: list[float], num_processes: int, nonfinite: int,
                 hashes: list[str], params) -> dict:  # fmt: skip
    """training_metadata.json's fields (before `write_run_folder` adds the library versions); `losses` are the whole
    run's, across resumes, and `hashes` each rank's adapter sha256."""
    return {
        "run_id": run_id,
        "steps": steps,
        **loss_means(losses),
        "num_processes": num_processes,
        "nonfinite_steps_skipped": nonfinite,
        "adapter_sha256": hashes[0],
        "rank_adapter_sha256": hashes,
        "trainable_parameters": sum(p.numel() for p in params),
    }


def loss_window(steps: int) -> int:
    """Steps averaged at each end of a run of `steps`: `LOSS_WINDOW`, or half the run when shorter, so the two ends
    never share a step (a 6-step run compared the mean of its 6 steps with itself)."""
    return min(LOSS_WINDOW, max(1, steps // 2))


def loss_means(losses: list[float]) -> dict:
    """The mean loss of the first and of the last `loss_window` steps."""
    if not losses:
        return {"first_loss": None, "final_loss": None}
    window = loss_window(len(losses))
    return {
        "first_loss": statistics.fmean(losses[:window]),
        "final_loss": statistics.fmean(losses[-window:]),
    }


def write_run_folder(
    transformer,
    cfg: Config,
    metadata: dict,
    samples: dict[str, Path],
    state: dict[str, torch.Tensor] | None = None,
) -> list[Path]:
    """The final adapter, resolved config, metadata and model card in `cfg.output_dir`. Returns what a published
    adapter is: those four files and the samples the card shows (not the checkpoints, logs or other samples)."""
    out = Path(cfg.output_dir)
    adapter = write_adapter_atomically(transformer, out, state)
    save_config(cfg, out / layout.CONFIG)
    # the file's sha256, as every image made with it records it (adapter_sha256 hashes the tensors, across ranks)
    metadata = {**metadata, "adapter_file_sha256": content_hash(adapter), "versions": library_versions()}
    atomic_write_text(out / layout.METADATA, json.dumps(metadata, indent=2, default=str))
    atomic_write_text(
        out / layout.CARD, model_card(cfg, metadata, {k: Path(v).relative_to(out) for k, v in samples.items()})
    )
    return [adapter, out / layout.CONFIG, out / layout.METADATA, out / layout.CARD, *map(Path, samples.values())]


def library_versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def model_card(cfg: Config, metadata: dict, samples: dict[str, Path]) -> str:
    """README.md of a run, for the Hub as much as for here: local paths appear by their last name only (a card pushed
    to the Hub carried this machine's absolute paths, user names included)."""
    trigger, pipeline = cfg.data.trigger_word, qmodel.pipeline_class().__name__
    hub_model = cfg.model.pretrained if is_hub_id(cfg.model.pretrained) else None
    model = hub_model or Path(cfg.model.pretrained).name
    final = metadata.get("final_loss")
    lines = [
        "---",
        *([f"base_model: {hub_model}"] if hub_model else []),  # the Hub links a hub id only
        "library_name: diffusers",
        "license: apache-2.0",
        "tags: [text-to-image, image-editing, lora, qwen-image, qwen-image-2.1, diffusers]",
        *([f"instance_prompt: {json.dumps(trigger)}"] if trigger else []),  # `#brand`, `[V]`, `a: b` are YAML
        "---",
        "",
        f"# LoRA for {model}",
        "",
        f"Trained with qwen-image-lora for {counted(metadata.get('steps') or 0, 'step')} on `{Path(cfg.data.path or '').name}`.",
        "",
        "## Trigger word",
        "",
        f"Use `{trigger}` in the prompt." if trigger else "None: the adapter applies without one.",
        "",
        "## Use it",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",  # a dtype given as a string makes diffusers load every component in float32
        f'pipe = {pipeline}.from_pretrained("{hub_model or f"path/to/{model}"}", torch_dtype=torch.bfloat16).to("cuda")',
        'pipe.load_lora_weights("path/to/this/folder")',
        f"image = pipe({json.dumps((trigger + ' ' if trigger else '') + 'a bottle on a marble counter')}).images[0]",
        "```",
        "",
        "ComfyUI: DoRA adapters have no exact ComfyUI form; use the diffusers file above."
        if cfg.lora.use_dora  # the export refuses them: the card told users to run it
        else "ComfyUI: `qwen-lora export --format comfyui <this folder>` writes `comfyui_lora.safetensors`.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| rank / alpha | {cfg.lora.rank} / {cfg.lora.alpha} |",
        f"| targets | {cfg.lora.targets} |",
        f"| DoRA / rsLoRA | {cfg.lora.use_dora} / {cfg.lora.use_rslora} |",
        f"| optimizer | {cfg.optim.name}, lr {cfg.optim.lr}, {cfg.optim.scheduler}, warmup {cfg.optim.warmup_steps} |",
        f"| steps x batch x accumulation x processes | {metadata.get('steps')} x {cfg.train.batch_size} x "
        f"{cfg.train.gradient_accumulation_steps} x {metadata.get('num_processes', 1)} |",
        f"| resolution | {cfg.data.resolution} |",
        f"| timesteps / weighting | {cfg.train.timestep_sampling} / {cfg.train.loss_weighting} |",
        f"| mixed precision | {cfg.train.mixed_precision} |",
        f"| frozen base | {cfg.model.quantize if cfg.model.quantize != 'none' else cfg.model.dtype} |",
        f"| EMA | {cfg.train.ema_decay or 'off'} |",
        f"| final loss (mean of last steps) | {f'{final:.4f}' if isinstance(final, float) else final} |",
    ]
    if samples:
        lines += ["", "## Samples", ""]
        v = cfg.validation
        prompts = {f"t2i_{i:02d}": p for i, p in enumerate(v.prompts)} | {
            f"edit_{i:02d}": e.prompt for i, e in enumerate(v.edits)
        }
        for name, rel in samples.items():
            lines.append(f"![{name}]({rel.as_posix()})  ")
            lines.append(f"*{prompts.get(name, name)}* (seed {v.seed})")
            lines.append("")
    return "\n".join(lines) + "\n"
