"""Adapters on one loaded base model: load many, pick or mix them per call, fuse for speed, unfuse, unload.

Thin over diffusers' `QwenImageLoraLoaderMixin` (load_lora_into_transformer / set_adapters / fuse_lora /
unfuse_lora / delete_adapters): the base weights are loaded once and never reloaded. Every file goes through
`adapter_format.read_adapter` first, so a foreign layout is converted and a foreign model is refused before peft
touches the transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_image_lora.adapter_format import read_adapter
from qwen_image_lora.console import loading_adapter
from qwen_image_lora.errors import AdapterError
from qwen_image_lora.io import content_hash
from qwen_image_lora.knobs import (
    SettingError,
    adapter_name_for,
    check_adapter_name,
    check_adapter_weight,
    unique_name,
)


@dataclass
class LoadedAdapter:
    name: str
    source: str
    layout: str
    weight: float  # the default weight this adapter was loaded with
    given: str = ""  # the path or hub id as the user gave it (`source` is the file it resolved to)
    sha256: str = ""  # of the weights file as loaded, so an image can say exactly which adapter made it


class Adapters:
    """The adapters loaded into one pipeline, and which of them are active (or fused) at what weight."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.loaded: dict[str, LoadedAdapter] = {}
        self.active: dict[str, float] = {}
        self.fused: dict[str, float] | None = None
        self._unfused_weights: dict[str, torch.Tensor] = {}  # module name -> base weight before fusing (on CPU)

    @property
    def names(self) -> list[str]:
        return list(self.loaded)

    def load(self, source: str | Path, name: str | None = None, weight: float = 1.0) -> str:
        """Load an adapter (file, folder or hub id) under `name` (default: the file or folder stem); returns the name.
        The new adapter is not activated; call `set` (or `Generator.generate` with `adapters=`)."""
        self._refuse_if_fused("load an adapter")
        check_adapter_weight("weight", weight)
        if name is None:  # a derived name is made unique: two runs' `brand` folders load as brand and brand-2
            name = unique_name(adapter_name_for(source), self.loaded)
        try:
            check_adapter_name("name", name)
        except SettingError as e:
            raise AdapterError(f"adapter name {name!r}: {e.message}") from None
        if name in self.loaded:
            raise AdapterError(
                f"adapter name {name!r} is already loaded (from {self.loaded[name].source}); pick another"
            )
        weights = read_adapter(source, self.pipe.transformer)
        with loading_adapter(name):
            self.pipe.load_lora_into_transformer(
                weights.state_dict,
                transformer=self.pipe.transformer,
                adapter_name=name,
                metadata=weights.metadata,
                _pipeline=self.pipe,
            )
        self.loaded[name] = LoadedAdapter(
            name, weights.source, weights.layout, weight, str(source), content_hash(weights.source)
        )
        self._apply(dict(self.active))  # loading activates the new adapter in peft; keep the previous selection
        return name

    def set(self, weights: dict[str, float] | None) -> None:
        """Activate exactly these adapters at these weights; None or {} runs the base model."""
        weights = dict(weights or {})
        for name, weight in weights.items():  # the limits of every edge: NaN rendered a black, transparent image
            check_adapter_weight(f"adapters[{name!r}]", weight)
        unknown = [n for n in weights if n not in self.loaded]
        if unknown:
            known = ", ".join(self.loaded) or "none loaded"
            raise AdapterError(f"unknown adapter {unknown[0]!r}; known adapters: {known}")
        if self.fused is not None:
            if weights != self.fused:
                raise AdapterError(f"adapters are fused as {self.fused}; unfuse before switching to {weights}")
            return
        if weights != self.active:
            self._apply(weights)

    def defaults(self) -> dict[str, float]:
        """Every loaded adapter at the weight it was loaded with."""
        return {a.name: a.weight for a in self.loaded.values()}

    def fuse(self, weights: dict[str, float] | None = None) -> None:
        """Merge the given (default: currently active) adapters into the base weights: no LoRA cost per step."""
        if self.fused is not None:
            raise AdapterError(f"adapters are already fused as {self.fused}; unfuse first")
        if weights is not None:
            self.set(weights)
        on = [name for name, weight in self.active.items() if weight != 0]  # 0 is off (`_apply`)
        if not on:
            raise AdapterError("no active adapter to fuse; load one and set its weight first")
        # Unfusing subtracts the delta again, which leaves the base weights a few ulps off; keep the touched
        # weights (on CPU) so unfuse gives back the exact base model.
        self._unfused_weights = {
            name: module.base_layer.weight.detach().to("cpu", copy=True)
            for name, module in self.pipe.transformer.named_modules()
            if hasattr(module, "base_layer") and any(a in getattr(module, "lora_A", {}) for a in on)
        }
        self.pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=on, safe_fusing=True)
        self.fused = dict(self.active)

    def unfuse(self) -> None:
        """Undo `fuse`: the base weights come back bit for bit."""
        if self.fused is None:
            return
        self.pipe.unfuse_lora(components=["transformer"])
        with torch.no_grad():
            for name, weight in self._unfused_weights.items():
                self.pipe.transformer.get_submodule(name).base_layer.weight.copy_(weight)
        self._unfused_weights = {}
        self.fused = None

    def unload(self, name: str | None = None) -> None:
        """Remove one adapter (or all of them) from the transformer."""
        self.unfuse()
        if name is None:
            if self.loaded:
                self.pipe.unload_lora_weights()
            self.loaded.clear()
            self.active = {}
            return
        if name not in self.loaded:
            raise AdapterError(f"unknown adapter {name!r}; known adapters: {', '.join(self.loaded) or 'none loaded'}")
        del self.loaded[name]
        self.active.pop(name, None)
        if self.loaded:  # peft expects the adapter it deletes to be inactive while others remain
            self.pipe.set_adapters(list(self.loaded), [a.weight for a in self.loaded.values()])
        self.pipe.delete_adapters([name])
        self._apply(dict(self.active))

    def _apply(self, weights: dict[str, float]) -> None:
        if not self.loaded:
            self.active = {}
            return
        # Weight 0 is off, as the studio shows it: a DoRA adapter at scale 0 still rescales each row by its
        # magnitudes in peft, so it was not the base model.
        on = {name: weight for name, weight in weights.items() if weight != 0}
        if on:
            self.pipe.enable_lora()  # set_adapters does not undo an earlier disable_lora
            self.pipe.set_adapters(list(on), list(on.values()))
        else:
            self.pipe.disable_lora()
        self.active = weights

    def _refuse_if_fused(self, action: str) -> None:
        if self.fused is not None:
            raise AdapterError(f"cannot {action} while adapters are fused ({self.fused}); unfuse first")
