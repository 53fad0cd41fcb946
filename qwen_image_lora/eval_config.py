"""The `validation:` and `eval:` sections of the config: what the previews and the evaluation render and score.

Part of the schema in `config.py` (`Config.validation`, `Config.eval`, loaded and checked with the rest of the file);
apart because both name prompts and edits under one rule: each listed once, as the evaluation counts its pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qwen_image_lora.knobs import SamplingConfig, SettingError, check_image_count, repeated_name
from qwen_image_lora.typed_yaml import ConfigError, fixed_field, path_field, paths_field


@dataclass
class EditExample:
    """One edit: reference images (1 to 10) and an instruction; `target` only for held-out scoring."""

    images: list[str] = paths_field()
    prompt: str = ""
    target: str | None = path_field()
    mask: str | None = path_field()

    def validate(self, where: str) -> None:
        try:
            check_image_count(len(self.images), least=1)
        except SettingError as e:
            raise ConfigError(f"{where}.{e}") from None
        if not self.prompt:  # a preview or eval render refuses it: found at load time, not mid-run
            raise ConfigError(f"{where}.prompt: give the edit's instruction")


@dataclass
class ValidationConfig(SamplingConfig):
    every_steps: int = 0  # 0 = only at the end
    prompts: list[str] = field(default_factory=list)
    edits: list[EditExample] = field(default_factory=list)
    # Fraction of the dataset held out for the fixed-noise flow-matching loss (0 = none).
    held_out_fraction: float = fixed_field(0.0)

    def validate(self, where: str) -> None:
        super().validate(where)
        _check_no_repeats(where, self.prompts, self.edits)  # eval falls back to these
        if self.every_steps < 0:
            raise ConfigError(f"{where}.every_steps: must be >= 0 (got {self.every_steps})")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ConfigError(f"{where}.held_out_fraction: must be in [0, 1) (got {self.held_out_fraction})")


def _check_no_repeats(where: str, prompts: list[str], edits: list[EditExample]) -> None:
    """Eval renders each prompt and edit at every seed and counts the pairs: one listed twice counts the same images
    twice (3 copies of one prompt at 2 seeds read as n = 6 and a confident verdict, where n = 2 says too few)."""
    if twice := repeated_name(_spaced(prompt) for prompt in prompts):  # " a bottle" renders all but the same images
        raise ConfigError(f"{where}.prompts[{twice[0]}]: {prompts[twice[0]]!r} is listed already (spacing aside); list "
                          "each prompt once (more prompts, or more seeds, give more samples)")  # fmt: skip
    if twice := repeated_name(_edit_identity(edit) for edit in edits):
        raise ConfigError(f"{where}.edits[{twice[0]}]: the same edit is listed already; list each edit once "
                          "(more edits, or more seeds, give more samples)")  # fmt: skip


def _edit_identity(edit: EditExample) -> str:
    """An edit by the files it names, resolved: `edits/../edits/a.png` or a symlinked folder is the same edit."""
    resolve = lambda path: None if path is None else str(Path(path).resolve())  # noqa: E731
    return repr(([resolve(p) for p in edit.images], _spaced(edit.prompt), resolve(edit.target), resolve(edit.mask)))


def _spaced(text: str) -> str:
    return " ".join(text.split())


@dataclass
class EvalConfig(SamplingConfig):
    """Sampling settings for the eval images (inherited); edits keep their input's size so preservation can compare
    pixel for pixel. Every prompt renders at each of `seeds` (empty: just `seed`)."""

    prompts: list[str] = field(default_factory=list)
    edits: list[EditExample] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    # Brand palette as hex colours, for the CIEDE2000 palette-fidelity score.
    palette: list[str] = field(default_factory=list)
    # Local CLIP/SigLIP weights for CLIPScore and reference similarity; skipped when null.
    clip_model: str | None = path_field(hub_id=True)
    # A folder of on-brand images; each t2i image is scored by its mean CLIP similarity to them.
    reference_images: str | None = path_field()
    output_dir: str = path_field("${output_dir}/eval")

    @property
    def render_seeds(self) -> list[int]:
        return list(self.seeds) or [self.seed]

    def validate(self, where: str) -> None:
        super().validate(where)
        bad = [c for c in self.palette if not re.fullmatch(r"#[0-9a-fA-F]{6}", c)]
        if bad:
            raise ConfigError(f"{where}.palette: colours must look like '#d7263d' (got {bad[0]!r})")
        _check_no_repeats(where, self.prompts, self.edits)
        if any(s < 0 for s in self.seeds) or len(set(self.seeds)) < len(self.seeds):
            # A repeated seed renders the same pair again: n identical samples, a zero-width interval, a verdict.
            raise ConfigError(f"{where}.seeds: must be distinct seeds >= 0 (got {self.seeds})")
