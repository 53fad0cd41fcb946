"""The LoRA adapter on the transformer: add it (through diffusers' PeftAdapterMixin, so saving and loading use
diffusers' own formats), read and restore its weights, and save it in the layout `load_lora_weights` reads. Files
are read and written through `qwen_image_lora.adapter_format`, the one home of adapter layouts.

Only the transformer gets an adapter. Its base weights stay frozen in their load dtype (bf16 on a GPU); the
LoRA weights are fp32 so that small updates are not rounded away.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from qwen_image_lora import adapter_format
from qwen_image_lora import model as qmodel
from qwen_image_lora.adapter_format import WEIGHTS_NAME  # noqa: F401 - re-exported for the recipe
from qwen_image_lora.config import LoRAConfig, ModelConfig
from qwen_image_lora.errors import AdapterError
from qwen_image_lora.train.ranks import is_sharded

ADAPTER_NAME = "default"


class LeanLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear with the same result to the bit and two fewer passes over the layer's output, each paid in
    the forward and again in the backward: peft multiplies the adapter's output by its scale, which is exactly 1.0
    whenever alpha == rank (every shipped config, and diffusers' example), and adds it into a new tensor, where the
    base layer's output is fresh and no backward needs it (nn.Linear saves its input, not its output). Every other
    case (another scale, DoRA and other variants, merged, disabled, per-sample adapters, an active adapter this layer
    lacks: it has no scale here) runs peft's own forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active_adapters
        if (
            args
            or kwargs
            or self.disable_adapters
            or self.merged
            or any(name in self.lora_variant or self.scaling.get(name) != 1 for name in active)
        ):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        result_dtype = result.dtype
        for name in active:
            lora_A = self.lora_A[name]
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
            delta = self.lora_B[name](lora_A(self.lora_dropout[name](x)))
            # In place only where peft's sum has the result's dtype (a bf16 base with fp32 LoRA sums in fp32)
            result = result.add_(delta) if delta.dtype == result.dtype else result + delta
        return result.to(result_dtype)


def lora_config(cfg: LoRAConfig):
    """The peft `LoraConfig` for our typed config (`init: default` is peft's kaiming-A / zero-B)."""

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
    )


def add_lora(transformer, cfg: LoRAConfig) -> list[torch.nn.Parameter]:
    """Freeze `transformer`, add a fresh LoRA adapter (or one initialised from `cfg.init_from`) and return the
    trainable parameters, all fp32."""
    transformer.requires_grad_(False)
    _check_each_target_matches(transformer, cfg.target_modules)
    try:
        transformer.add_adapter(lora_config(cfg), adapter_name=ADAPTER_NAME)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise AdapterError(f"lora.targets: {e}") from e
    for module in transformer.modules():
        # Not the quantized layers' LoRA classes, nor a base layer whose backward might need its output
        if type(module) is PeftLoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.__class__ = LeanLoraLinear
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise AdapterError(f"lora.targets: {cfg.targets!r} matched no layer of the transformer")
    for p in params:
        p.data = p.data.float()
    if cfg.init_from:
        try:
            load_adapter_file(transformer, cfg.init_from)
        except AdapterError as e:  # "adapter weight img_in.lora_A.weight: shape ..." named neither field nor file
            raise AdapterError(f"lora.init_from {cfg.init_from}: {e}", "lora.init_from") from None
    return params


def check_targets_before_loading(model: ModelConfig, cfg: LoRAConfig) -> None:
    """`add_lora`'s target check on the transformer's module tree built on the meta device from its config.json (no
    weights, no memory): a typo in lora.targets fails before the data is prepared and the weights load."""
    if isinstance(cfg.targets, str):  # a preset: its names are the model's (the 7B tree takes ~2 s to build on CPU)
        return
    _check_each_target_matches(qmodel.meta_transformer(model.pretrained, model.revision), cfg.target_modules)


def _check_each_target_matches(transformer, targets) -> None:
    """peft refuses a target list only when no name matches, so one typo among good names would silently train the
    others alone. A name matches a module whose dotted name equals it or ends with it (peft's rule for lists)."""
    if isinstance(targets, str):  # a preset such as all-linear
        return
    names = [name for name, _ in transformer.named_modules() if name]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            suffixes = {".".join(name.split(".")[-k:]) for name in names for k in (1, 2)}
            close = difflib.get_close_matches(target, sorted(suffixes), n=3)
            hint = f" (e.g. {', '.join(map(repr, close))})" if close else ""
            raise AdapterError(f"lora.targets: {target!r} matches no layer of the transformer{hint}")


def get_lora_state(transformer) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed as peft names them (`transformer_blocks.0.attn.to_q.lora_A.weight`),
    detached CPU copies. Under FSDP2 every rank must call it: the shards are gathered whole on each."""

    whole = None
    if is_sharded(transformer):  # the adapter is the trainable part; the frozen base stays sharded
        whole = get_model_state_dict(
            transformer, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        )
    state = get_peft_model_state_dict(transformer, state_dict=whole, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_lora_weights_into(transformer, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (peft names, with or without a `transformer.` prefix) into the live adapter, keeping
    each parameter's dtype. Any missing or unexpected key is an error, not a warning."""

    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    ours = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)  # DTensors under FSDP2: global shapes
    missing, unexpected = set(ours) - set(state), set(state) - set(ours)
    if missing or unexpected:
        raise AdapterError(
            "adapter weights do not match this adapter's layout (check lora.rank/targets/use_dora): "
            f"missing {sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {sorted(unexpected)[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, value in state.items():
        if ours[name].shape != value.shape:
            raise AdapterError(
                f"adapter weight {name}: shape {tuple(value.shape)} in the file, {tuple(ours[name].shape)} here "
                "(does lora.rank match the adapter's rank?)"
            )
    # Every rank holds the whole file; under FSDP2 each keeps its own shard of it.
    state = {
        k: distribute_tensor(v.to(ours[k].dtype), ours[k].device_mesh, ours[k].placements, src_data_rank=None)
        if isinstance(ours[k], DTensor)
        else v
        for k, v in state.items()
    }
    dtypes = {n: p.dtype for n, p in transformer.named_parameters()}
    set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    for n, p in transformer.named_parameters():  # set_peft_model_state_dict may cast; keep LoRA in fp32
        if p.dtype != dtypes[n]:
            p.data = p.data.to(dtypes[n])


def load_adapter_file(transformer, source: str | Path) -> None:
    """Set the live adapter from an adapter file or folder in any layout `adapter_format` reads. Each lora_B is
    rescaled by (the file's scale / this adapter's scale), so every module's delta is the file's whatever this
    adapter's alpha (a ComfyUI or kohya file has its alpha folded in: scale 1)."""
    weights = adapter_format.read_adapter(source, transformer)
    state = {}
    for key, value in weights.state_dict.items():
        name = key.removeprefix("transformer.")
        if name.endswith(".lora_B.weight"):
            module = name.removesuffix(".lora_B.weight")
            ours = getattr(transformer.get_submodule(module), "scaling", {}).get(ADAPTER_NAME)
            theirs = adapter_format.module_scale(weights.config, module, value.shape[1])
            if ours is not None and ours != theirs:
                value = value * (theirs / ours)
        state[name] = value
    load_lora_weights_into(transformer, state)


def adapter_metadata(transformer) -> dict:
    """The peft config as diffusers stores it next to the weights (rank, alpha, targets, DoRA/rsLoRA)."""
    meta = transformer.peft_config[ADAPTER_NAME].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}


def save_adapter(transformer, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (keys `transformer.`-prefixed, peft config in the header) that
    `QwenImage21Pipeline.load_lora_weights(directory)` loads unchanged. `state` overrides the live weights
    (e.g. the EMA copy)."""
    state = get_lora_state(transformer) if state is None else state
    return adapter_format.write_diffusers(directory, state, adapter_metadata(transformer))
