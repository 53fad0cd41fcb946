"""Typed configuration: one YAML file, parsed once into nested dataclasses, with `a.b=value` overrides.

This module is the schema (the `validation:` and `eval:` sections live in `eval_config.py`, `serve:` in
`serve_config.py`): defaults live here and nowhere else.
`typed_yaml.py` does the loading: unknown keys, wrong types and out-of-range values fail at load time with the dotted
field name, the accepted values and, for a misspelt key, the nearest valid one. Fields whose metadata says `path` are
resolved relative to the config file. `${dotted.key}` in a string is replaced by that key's value (e.g.
`cache_dir: ${output_dir}/cache`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union, get_type_hints

import yaml

from qwen_image_lora import typed_yaml
from qwen_image_lora.captions import template_problem
from qwen_image_lora.eval_config import EvalConfig, ValidationConfig
from qwen_image_lora.io import atomic_write_text
from qwen_image_lora.presets import LORA_TARGETS
from qwen_image_lora.serve_config import ServeConfig
from qwen_image_lora.typed_yaml import FIXED, ConfigError, fixed_field, path_field, require

DEFAULT_MODEL = "Qwen/Qwen-Image-2.1"
CACHE_ENV = "QWEN_LORA_CACHE"


def default_cache_dir() -> str:
    """The data cache every run shares unless its config names one: $QWEN_LORA_CACHE, else
    $XDG_CACHE_HOME/qwen-image-lora, else ~/.cache/qwen-image-lora. It sits outside any run folder, so a run in a
    new output_dir finds what earlier runs encoded and screened (entries are keyed by content, verdicts by data set)."""
    folder = (
        os.environ.get(CACHE_ENV)
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-image-lora"
    )
    return str(Path(folder).expanduser().absolute())  # a relative $QWEN_LORA_CACHE means the working folder's


@dataclass
class ModelConfig:
    # A hub id or a local folder in the diffusers layout; the tiny test model and the real one differ only here.
    pretrained: str = path_field(DEFAULT_MODEL, hub_id=True, fixed=True)
    revision: str | None = fixed_field(None)
    # dtype of the frozen weights; LoRA weights always train in fp32.
    dtype: Literal["bfloat16", "float16", "float32"] = fixed_field("bfloat16")
    # How the transformer runs (not what it computes, so a resume may change them; `speed.configure_transformer`).
    # sdpa-segments: one SDPA call per block-causal segment, no compiler needed. flex: one flex_attention call;
    # needs compile, and trains on CUDA only (no flex backward on CPU).
    attention: Literal["sdpa-segments", "flex"] = "sdpa-segments"
    # diffusers' dispatcher backend for the calls without a block-causal mask (KV-cached denoising steps), e.g.
    # _native_flash, _native_cudnn, flash, sage; null = native SDPA.
    attention_backend: str | None = None
    # torch.compile: false (YAML's `off` too) | blocks (one graph shared by the repeated blocks) | full (the whole
    # transformer).
    compile: Literal[False, "blocks", "full"] = False
    # Training only: store the frozen base's block linears quantized, through diffusers' backends (int8, fp8:
    # torchao weight-only, CPU or GPU; nf4: bitsandbytes 4-bit, CUDA only). LoRA trains in fp32 on top and the
    # saved adapter is a plain LoRA for the unquantized model, which generate, eval and serve load.
    quantize: Literal["none", "int8", "fp8", "nf4"] = fixed_field("none")

    def validate(self, where: str) -> None:
        if not self.pretrained:
            raise ConfigError(f"{where}.pretrained: give a hub id such as {DEFAULT_MODEL!r} or a local folder")
        if self.attention == "flex" and not self.compile:
            raise ConfigError(
                f"{where}.attention: flex needs {where}.compile: blocks or full (uncompiled, "
                "flex_attention materialises the whole fp32 score matrix); or use sdpa-segments"
            )
        if self.attention_backend is not None:  # deferred, and only when set: diffusers' backend list takes seconds
            from qwen_image_lora.speed import check_speed_settings  # noqa: PLC0415 - the config stays light (speed imports torch)

            try:
                check_speed_settings(self.attention, self.attention_backend, self.compile)
            except ValueError as e:
                raise ConfigError(str(e)) from None


@dataclass
class DataConfig:
    # A folder of images with same-name .txt captions, a .jsonl/.csv manifest, or a datasets dataset.
    path: str | None = path_field(fixed=True)
    format: Literal["auto", "folder", "manifest", "hf"] = fixed_field("auto")
    # For `hf` datasets: our column name -> the dataset's column name (image, caption, target, instruction, sources).
    columns: dict[str, str] = field(default_factory=dict, metadata=FIXED)
    split: str = fixed_field("train")
    # The pixel budget (~resolution^2 pixels) of training buckets AND of generation (generate, edit, batch, eval,
    # serve): one name, so an adapter is used at the size it was trained at. Sides are multiples of 32.
    resolution: int = fixed_field(1024)
    max_upscale: float = fixed_field(1.0)
    crop: Literal["center", "random"] = fixed_field("center")
    alpha: Literal["composite", "keep"] = fixed_field("composite")
    background: str = fixed_field("#ffffff")
    trigger_word: str | None = fixed_field(None)
    caption_template: str = fixed_field("{caption}")
    caption_dropout: float = fixed_field(0.0)
    # Kept so the configs of earlier runs load; only 1 is taken (see `validate`).
    repeats: int = fixed_field(1)
    # Latents, embeddings and the doctor's verdicts (`default_cache_dir`); null: none, training encodes in memory.
    cache_dir: str | None = path_field(dataclasses.MISSING, default_factory=default_cache_dir)
    num_workers: int = 0
    # `data doctor` limits: items beyond them are excluded from prepare and training (never deleted).
    min_side: int = fixed_field(64)
    max_aspect: float = fixed_field(4.0)
    max_megapixels: float = fixed_field(100.0)
    max_caption_tokens: int = fixed_field(1024)
    # Entries per cache shard written by `data prepare` (per process).
    shard_size: int = 256
    # `data prepare`: up to this many same-size images per VAE call and prompts per text-encoder call. Not resume-
    # fixed: whatever it is, the cache holds the per-sample tensors one-at-a-time encoding writes (fp32: within 5e-6).
    prepare_batch_size: int = 1

    def validate(self, where: str) -> None:
        if self.resolution % 32 or not 64 <= self.resolution <= 4096:
            raise ConfigError(
                f"{where}.resolution: must be a multiple of 32 between 64 and 4096 (got {self.resolution})"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"{where}.caption_dropout: must be in [0, 1) (got {self.caption_dropout})")
        if self.max_upscale < 1.0:
            raise ConfigError(f"{where}.max_upscale: must be >= 1.0 (1.0 = never upscale; got {self.max_upscale})")
        # What fill_caption does with every caption: `{trigger_word}` was a KeyError traceback in every command.
        if problem := template_problem(self.caption_template, self.trigger_word or ""):
            raise ConfigError(f"{where}.caption_template: {problem} in {self.caption_template!r}; it takes {{caption}} "
                              "and {trigger} (write a literal brace as {{ or }})")  # fmt: skip
        if self.repeats != 1:  # accepted and never read: a kohya user's `repeats: 10` changed nothing, silently
            raise ConfigError(f"{where}.repeats: one data set has nothing to balance against, so repeating it would "
                              "only rename epochs; remove it (train.max_steps sets how long training runs)")  # fmt: skip
        require(where, self, lambda v: v >= 1, ">= 1", "min_side", "max_caption_tokens", "shard_size")
        require(where, self, lambda v: v >= 1.0, ">= 1.0", "max_aspect")
        require(where, self, lambda v: v > 0, "> 0", "max_megapixels")
        if self.prepare_batch_size < 1:
            raise ConfigError(
                f"{where}.prepare_batch_size: must be >= 1 (1 = one item at a time; got {self.prepare_batch_size})"
            )
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", self.background):
            raise ConfigError(f"{where}.background: must be a colour like '#ffffff' (got {self.background!r})")


@dataclass
class LoRAConfig:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    # peft's init_lora_weights: "default" (kaiming A, zero B), "gaussian", "pissa", "olora", ...
    init: str = "default"
    # A preset name (attention, attention+mlp, all-linear) or an explicit list of module-name suffixes.
    targets: Union[str, list[str]] = "attention"
    use_dora: bool = False
    use_rslora: bool = False
    # Start from an existing adapter (folder or .safetensors) instead of fresh weights.
    init_from: str | None = path_field(hub_id=True)

    def validate(self, where: str) -> None:
        if not 1 <= self.rank <= 1024:
            raise ConfigError(f"{where}.rank: must be in 1..1024 (got {self.rank})")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha: must be > 0 (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1) (got {self.dropout})")
        if isinstance(self.targets, str) and self.targets not in LORA_TARGETS:
            raise ConfigError(
                f"{where}.targets: unknown preset {self.targets!r}; use one of {sorted(LORA_TARGETS)} "
                "or a list of module names such as [to_q, to_v]"
            )
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError(f"{where}.targets: the module list is empty")

    @property
    def target_modules(self) -> list[str] | str:
        return LORA_TARGETS[self.targets] if isinstance(self.targets, str) else list(self.targets)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Any diffusers.optimization scheduler name.
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = (
        "constant_with_warmup"
    )
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # null = no clipping (the norm is still measured for the guards and the log)

    def validate(self, where: str) -> None:
        require(where, self, lambda v: v > 0, "> 0", "lr", "eps")
        require(where, self, lambda v: v > 0, "> 0, or null for no clipping", "max_grad_norm")
        require(where, self, lambda v: v >= 0, ">= 0", "weight_decay", "warmup_steps")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas: must be two numbers in [0, 1) (got {self.betas})")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = fixed_field(1)
    gradient_accumulation_steps: int = fixed_field(1)
    mixed_precision: Literal["bf16", "fp16", "no"] = fixed_field("bf16")
    # true, false, or "auto": checkpoint the fewest blocks that keep the planned peak under memory_budget_gb.
    gradient_checkpointing: Union[bool, Literal["auto"]] = True
    # Frozen blocks kept in pinned CPU memory and streamed to the GPU one block ahead of use (forward, and the
    # recomputed forward of backward); a number, or "auto": the fewest that keep the plan under memory_budget_gb.
    # Offloaded blocks are always checkpointed. One process only (DDP needs the whole model on each GPU).
    offload_blocks: Union[int, Literal["auto"]] = 0
    # GPU size the `auto` settings plan for (`qwen-lora plan --gpu-memory` picks the full recipe for one), or
    # "auto": the size of the GPU the run has (24 planned a 24 GB recipe on an 80 GB card, and on a 12 GB one).
    memory_budget_gb: Union[float, Literal["auto"]] = 24.0
    seed: int = 42
    timestep_sampling: Literal["uniform", "logit_normal", "shifted"] = fixed_field("logit_normal")
    logit_mean: float = fixed_field(0.0)
    logit_std: float = fixed_field(1.0)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = fixed_field("none")
    ema_decay: float | None = fixed_field(None)
    # Edit pairs with a `mask` (white = changed): the loss on changed latents weighs this much relative to the kept
    # background (1.0 = off), so an adapter learns the edit rather than the background it keeps.
    mask_loss_weight: float = fixed_field(1.0)
    # Guards against silent failures.
    max_nonfinite_losses: int = 5
    check_learning_after: int = 10
    divergence_factor: float = 3.0
    log_every: int = 1

    def validate(self, where: str) -> None:
        require(
            where, self, lambda v: v >= 1, ">= 1", "max_steps", "batch_size", "gradient_accumulation_steps", "log_every"
        )
        require(where, self, lambda v: 0 <= v < 2**32, f"in 0..{2**32 - 1}", "seed")  # what accelerate's set_seed takes
        require(where, self, lambda v: v > 0, "> 0", "logit_std")
        require(where, self, lambda v: v > 1, "> 1", "divergence_factor")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay: must be in (0, 1) or null (got {self.ema_decay})")
        if self.mask_loss_weight <= 0:
            raise ConfigError(f"{where}.mask_loss_weight: must be > 0 (1.0 = off; got {self.mask_loss_weight})")
        if self.memory_budget_gb != "auto" and self.memory_budget_gb <= 0:
            raise ConfigError(f"{where}.memory_budget_gb: must be > 0 or auto (got {self.memory_budget_gb})")
        if self.offload_blocks != "auto" and self.offload_blocks < 0:
            raise ConfigError(f"{where}.offload_blocks: must be >= 0 or auto (got {self.offload_blocks})")
        if self.offload_blocks != 0 and self.gradient_checkpointing is False:  # `auto` too: it could never offload
            raise ConfigError(
                f"{where}.offload_blocks: offloaded blocks are recomputed in backward, so they need "
                f"{where}.gradient_checkpointing: true or auto (got false)"
            )


@dataclass
class CheckpointConfig:
    every_steps: int = 250
    keep_last: int = 3
    # null, "latest", or a checkpoint folder.
    resume: str | None = None

    def validate(self, where: str) -> None:
        require(where, self, lambda v: v >= 1, ">= 1", "every_steps", "keep_last")


@dataclass
class TrackingConfig:
    backend: Literal["none", "wandb", "tensorboard"] = "none"
    project: str = "qwen-image-lora"
    run_name: str | None = None
    log_images: bool = True
    upload_adapter: bool = True

    def validate(self, where: str) -> None:
        # What wandb.init refuses, after the weights have loaded: said first, naming the field
        bad = "".join(sorted(set(self.project) & set("/\\#?%:")))
        if self.backend == "wandb" and (bad or not 0 < len(self.project) <= 128):
            raise ConfigError(f"{where}.project: {self.project!r} is not a W&B project name: 1 to 128 characters, "
                              f"none of / \\ # ? % :" + (f" (it has {bad})" if bad else ""))  # fmt: skip


FACTORING_INITS = ("pissa", "olora", "corda", "eva", "loftq")  # peft inits that decompose the base weights


@dataclass
class Config:
    output_dir: str = path_field("outputs/run")
    model: ModelConfig = field(default_factory=ModelConfig)  # the base weights and how they run
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata=FIXED)  # every LoRA setting
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # Set by the loader: the file this config came from (for messages) and its folder (for paths), and the overrides
    # given with it (for a command a message gives back: `qwen-lora plan ...`).
    source: str | None = field(default=None, repr=False, compare=False, metadata={"internal": True})
    overrides: list[str] = field(default_factory=list, repr=False, compare=False, metadata={"internal": True})

    def validate(self, where: str) -> None:
        """Settings of two sections that cannot go together, refused at load by every command: `validate` said OK
        to them, and training refused them later (offloading with compile after the weights had loaded)."""
        if self.model.quantize != "none" and str(self.lora.init).startswith(FACTORING_INITS):
            raise ConfigError(f"lora.init: {self.lora.init} factors the base weights, which a {self.model.quantize} "
                              "base cannot give; use lora.init: gaussian with a quantized base, or model.quantize: "
                              "none")  # fmt: skip
        data = Path(self.data.path) if self.data.path else None
        if data is not None and data.is_dir() and data.resolve() == Path(self.output_dir).resolve():
            raise ConfigError(f"output_dir: {self.output_dir} is data.path itself, so the run's previews would train "
                              "the next run; give the run a folder of its own (e.g. outputs/run)")  # fmt: skip
        if self.train.offload_blocks not in (0, "auto") and self.model.compile:
            raise ConfigError("train.offload_blocks: not with model.compile (the streaming hooks sit inside the "
                              "compiled blocks); set model.compile: false, or train.offload_blocks: 0")  # fmt: skip


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or the defaults when `path` is None), apply `a.b=value` overrides, check everything."""
    raw: dict = {}
    base = Path.cwd()
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        raw = typed_yaml.load_yaml(text, str(path)) or {}  # refuses a key given twice
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
        base = path.resolve().parent
    for item in overrides:
        typed_yaml.apply_override(raw, item, where)
    try:  # Defaults go through the same interpolation and path resolution as the file's own values.
        raw = typed_yaml.merge(to_dict(Config()), raw)
        raw = typed_yaml.interpolate(raw, raw, where)
        cfg = typed_yaml.build(Config, raw, "", where, base)
        cfg.source = where
        cfg.overrides = list(overrides)
        typed_yaml.validate(cfg, "", where)
    except ConfigError as e:
        raise typed_yaml.blame_override(e, where, overrides) from None
    return cfg


def resume_fixed_fields(cls=None, prefix: str = "") -> list[str]:
    """Dotted names of the fields (or whole sections) marked FIXED: what a resume must not change."""
    cls = cls or Config
    hints, names = get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if f.metadata.get("resume") == "fixed":
            names.append(dotted)
        elif dataclasses.is_dataclass(hints[f.name]):
            names.extend(resume_fixed_fields(hints[f.name], dotted))
    return names


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (for the run folder, checkpoints and the tracker)."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):  # the loader's, not the user's
            del out[f.name]
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
