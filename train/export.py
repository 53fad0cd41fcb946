"""The run's output folder and other adapter layouts.

    <output_dir>/pytorch_lora_weights.safetensors   diffusers format: `transformer.`-prefixed peft keys, the peft
                                                     config in the header; `QwenImage21Pipeline.load_lora_weights`
                                                     loads it unchanged
    <output_dir>/config.yaml                        the resolved config
    <output_dir>/training_metadata.json             steps, losses, timings, versions
    <output_dir>/README.md                          model card: base model, trigger word, settings, samples

`export_adapter` (`qwen-lora export --format comfyui`) writes the ComfyUI layout: `diffusion_model.<module>.lora_down.weight`,
`.lora_up.weight` and a scalar `.alpha` per module, with alpha chosen so that alpha / rank equals the adapter's
own scale (alpha / rank, or alpha / sqrt(rank) under rsLoRA). diffusers reads it back through
`_convert_non_diffusers_qwen_lora_to_diffusers`, which folds alpha / rank into the weights.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from qwen_image_lora.config import Config, save_config
from qwen_image_lora.io import atomic_path, atomic_write_text
from qwen_image_lora.train import adapter as lora_adapter

COMFYUI_NAME = "comfyui_lora.safetensors"


def write_adapter_atomically(transformer, output_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """`pytorch_lora_weights.safetensors` in `output_dir`, replaced in one rename."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=output_dir))
    try:
        written = lora_adapter.save_adapter(transformer, tmp, state)
        final = output_dir / lora_adapter.WEIGHTS_NAME
        written.replace(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_run_folder(
    transformer,
    cfg: Config,
    metadata: dict,
    samples: dict[str, Path],
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The final adapter, resolved config, metadata and model card in `cfg.output_dir`."""
    out = Path(cfg.output_dir)
    write_adapter_atomically(transformer, out, state)
    save_config(cfg, out / "config.yaml")
    atomic_write_text(out / "training_metadata.json", json.dumps(metadata, indent=2, default=str))
    atomic_write_text(out / "README.md", model_card(cfg, metadata, {k: Path(v).relative_to(out) for k, v in samples.items()}))
    return out


def model_card(cfg: Config, metadata: dict, samples: dict[str, Path]) -> str:
    trigger = cfg.data.trigger_word
    lines = [
        "---",
        f"base_model: {cfg.model.pretrained}",
        "library_name: diffusers",
        "license: apache-2.0",
        "tags: [text-to-image, image-editing, lora, qwen-image, qwen-image-2.1, diffusers]",
        *([f"instance_prompt: {trigger}"] if trigger else []),
        "---",
        "",
        f"# LoRA for {cfg.model.pretrained}",
        "",
        f"Trained with qwen-image-lora for {metadata.get('steps')} steps on `{cfg.data.path}`.",
        "",
        "## Trigger word",
        "",
        f"Use `{trigger}` in the prompt." if trigger else "None: the adapter applies without one.",
        "",
        "## Use it",
        "",
        "```python",
        "from diffusers import QwenImage21Pipeline",
        f'pipe = QwenImage21Pipeline.from_pretrained("{cfg.model.pretrained}", torch_dtype="bfloat16").to("cuda")',
        'pipe.load_lora_weights("path/to/this/folder")',
        f'image = pipe("{(trigger + " ") if trigger else ""}a bottle on a marble counter").images[0]',
        "```",
        "",
        "ComfyUI: `qwen-lora export --format comfyui <this folder>` writes `comfyui_lora.safetensors`.",
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
        f"| EMA | {cfg.train.ema_decay} |",
        f"| final loss (mean of last steps) | {metadata.get('final_loss')} |",
    ]
    if samples:
        lines += ["", "## Samples", ""]
        v = cfg.validation
        prompts = {f"t2i_{i:02d}": p for i, p in enumerate(v.prompts)} | {f"edit_{i:02d}": e.prompt for i, e in enumerate(v.edits)}
        for name, rel in samples.items():
            lines.append(f"![{name}]({rel.as_posix()})  ")
            lines.append(f"*{prompts.get(name, name)}* (seed {v.seed})")
            lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ ComfyUI


def read_diffusers_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state with `transformer.` keys, peft config) from our adapter folder or its .safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    file = path / lora_adapter.WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {lora_adapter.WEIGHTS_NAME} here; give an adapter folder written by training")
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    raw = json.loads(header.get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix("transformer."): v for k, v in raw.items()}
    return state, config


def to_comfyui(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers/peft keys -> `diffusion_model.<module>.lora_down/lora_up/alpha`, preserving each module's scale."""
    if config.get("use_dora"):
        raise ValueError("export --format comfyui: DoRA adapters have no lora_down/lora_up equivalent; train without lora.use_dora")
    if not config:
        raise ValueError("export: the adapter file has no peft config in its header (was it written by qwen-lora?)")
    out = {}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k or ".lora_B." in k})
    for module in modules:
        down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        name = module.removeprefix("transformer.")
        rank = down.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        out[f"diffusion_model.{name}.lora_down.weight"] = down.contiguous()
        out[f"diffusion_model.{name}.lora_up.weight"] = up.contiguous()
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return out


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def export_adapter(adapter_dir: str | Path, fmt: str = "comfyui", output: str | Path | None = None) -> Path:
    """Write `adapter_dir`'s adapter in another layout; returns the file written."""
    from safetensors.torch import save_file

    if fmt != "comfyui":
        raise ValueError(f"export --format: unknown {fmt!r}; supported: comfyui")
    state, config = read_diffusers_adapter(adapter_dir)
    converted = to_comfyui(state, config)
    adapter_dir = Path(adapter_dir)
    target = Path(output) if output else (adapter_dir if adapter_dir.is_dir() else adapter_dir.parent) / COMFYUI_NAME
    with atomic_path(target) as tmp:
        save_file(converted, str(tmp), metadata={"format": "pt", "ss_network_dim": str(config.get("r")), "ss_network_alpha": str(config.get("lora_alpha"))})
    return target
