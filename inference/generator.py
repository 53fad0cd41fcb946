"""The one sampling path: training previews, evaluation, the CLI, batch jobs and the HTTP service all call
`Generator.generate`, so a preview at seed s is the image a user gets at seed s."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora import speed, typed_yaml
from qwen_image_lora.config import ModelConfig
from qwen_image_lora.errors import InputError
from qwen_image_lora.image_files import read_settings
from qwen_image_lora.inference import layers as layer_output
from qwen_image_lora.inference import masking
from qwen_image_lora.inference.adapters import Adapters
from qwen_image_lora.inference.mask_rules import prepare_mask
from qwen_image_lora.io import content_hash
from qwen_image_lora.knobs import (
    GUIDANCE_UNUSED,
    MASK_FEATHER,
    NEGATIVE_UNUSED,
    SamplingConfig,
    SettingError,
    check_image_count,
    check_masked_size,
    check_range,
)
from qwen_image_lora.presets import ASPECT_RATIOS, MAX_SIDE, SIDE_MULTIPLE

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 1024  # with the model's own tokenizer, before the chat template is added


def one_side_size(settings, aspect: tuple[int, int]) -> tuple[int, int] | None:
    """(width, height) when exactly one side is given: the other follows `aspect` (an edit's input, else square) on
    the 32-px grid. One the grid cannot hold (a 1:10 photo at width 1024 needs 10240) is refused naming the side
    given: it was clamped to 4096 or 32, and the aspect changed without a word."""
    if (settings.width is None) == (settings.height is None):
        return None
    w, h = aspect
    given, side, other_name, other = (
        ("width", settings.width, "height", settings.width * h / w)
        if settings.width is not None
        else ("height", settings.height, "width", settings.height * w / h)
    )
    snapped = round(other / SIDE_MULTIPLE) * SIDE_MULTIPLE
    if not SIDE_MULTIPLE <= snapped <= MAX_SIDE:
        raise SettingError(given, f"{side} keeps the {w}x{h} image's aspect only with a {other_name} of {other:.0f} "
                                  f"px, outside {SIDE_MULTIPLE}..{MAX_SIDE}; give both sides, or a {given} that fits",
                           (other_name, given))  # fmt: skip
    return (side, snapped) if given == "width" else (snapped, side)


def size_for_aspect(aspect_ratio: str, resolution: int = 1024) -> tuple[int, int]:
    """(width, height) for a preset by the one sizing rule (`model.fit_size`)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise InputError(f"aspect_ratio: {aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}", "aspect_ratio")
    a, b = ASPECT_RATIOS[aspect_ratio]
    return qmodel.fit_size(a, b, resolution)


def check_input_aspects(images: list[Image.Image], resolution: int, field: str = "images") -> None:
    """The pipeline sizes each input image by the sizing rule; one too elongated would get a side of 0 px, or a
    size the text encoder's image processor refuses (a 2048x12 photo: HTTP 500 from transformers' `smart_resize`).
    Needs no model, so the CLI checks it before loading one."""
    sizable = qmodel.max_aspect(resolution)
    limit = min(sizable, qmodel.ENCODER_MAX_ASPECT)
    for i, image in enumerate(images, 1):
        w, h = image.size
        sized = qmodel.fit_size(w, h, resolution) if max(w, h) < sizable * min(w, h) else None
        if sized is None or max(sized) > qmodel.ENCODER_MAX_ASPECT * min(sized):
            read = "" if sized is None else f" (sized to {sized[0]}x{sized[1]}, {max(sized) / min(sized):.0f}:1)"
            raise InputError(f"{field}: image {i} is {w}x{h} (aspect {max(w, h) / min(w, h):.1f}:1){read}; at "
                             f"resolution {resolution} the model takes aspect ratios under {limit:g}:1; crop or pad "
                             "it closer to square", field, i - 1)  # fmt: skip


@dataclass
class GenerationRequest(SamplingConfig):
    """One generation: a prompt, its inputs, and the sampling settings (the `SamplingConfig` fields, keyword-only)."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)  # 0 = text-to-image, 1..10 = edit
    # Edits come back at the input's size unless this is False (then at the model's working size).
    keep_input_size: bool = True
    # Adapter name -> weight for this call ({} = the base model); None leaves the pipeline's adapters as they are.
    adapters: dict[str, float] | None = None
    # Masked edit: white = may change, black = kept exactly (applies to the last image; the result keeps its size).
    mask: Image.Image | None = None
    mask_feather: int = MASK_FEATHER.default

    def check(self) -> None:
        """The sampling rules, the feather's limits (the API took 65, which every other edge refuses), a masked edit
        given no size, and one side of an edit that its input's aspect can follow. (Edges check their settings with
        an empty prompt; `Generator.generate` asks for one.)"""
        super().check()
        check_range("mask_feather", self.mask_feather, MASK_FEATHER.low, MASK_FEATHER.high)
        if self.mask is not None:
            check_masked_size(self)
        if self.images and (self.width is None) != (self.height is None):
            one_side_size(self, self.images[-1].size)

    @classmethod
    def from_settings(cls, settings, prompt: str, **changes) -> "GenerationRequest":
        """The one way a config section, job line, CLI namespace or HTTP body (anything carrying sampling fields)
        becomes a request; a field it lacks keeps its default (layers take no size). `changes` override single
        fields (e.g. the seed of this render)."""
        names = [f.name for f in dataclasses.fields(SamplingConfig) if hasattr(settings, f.name)]
        sampling = {name: getattr(settings, name) for name in names}
        return cls(prompt=prompt, **{**sampling, **changes})


@dataclass
class InputRecord:
    """An input image (or mask) as an image's settings name it."""

    sha256: str
    path: str | None = None  # relative to the image's folder; None when only its bytes were known (the API)


@dataclass
class AdapterRecord:
    name: str
    weight: float
    sha256: str  # of the weights file
    path: str | None = None  # relative to the image's folder, or a hub id; None from the API (the server's files)


@dataclass
class ModelRecord:
    pretrained: str  # a hub id or an absolute folder: a model stays put while images travel
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the transformer's, as it ran


@dataclass
class ImageSettings(SamplingConfig):
    """What made an image, written into it (`Generator.describe`, `image_files.encode_image`) and read back by
    `qwen-lora generate --from`: the sampling fields under `SamplingConfig`'s names (read by the same typed loader as
    configs and batch lines), holding the values that acted, plus the model, pixel budget, adapters and inputs."""

    prompt: str = ""
    model: ModelRecord | None = None
    resolution: int = 1024  # `data.resolution`: an edit's inputs are sized by it
    loras: list[AdapterRecord] = field(default_factory=list)
    images: list[InputRecord] = field(default_factory=list)  # [] = text-to-image
    mask: InputRecord | None = None
    mask_feather: int | None = MASK_FEATHER.default  # None without a mask, where it did not act
    quality: int | None = None  # a JPEG's or WebP's (`image_files.encode_image` adds it); None for a PNG

    @classmethod
    def read(cls, source: str | Path) -> "ImageSettings | None":
        """The settings an image file carries; None when it carries none of ours. Raises InputError naming the file
        and the field that does not fit."""
        block = read_settings(source)
        if block is None:
            return None
        settings = typed_yaml.build(cls, block, "", str(source), Path(source).parent, exact=True)
        settings.validate(f"{source}: settings")
        return settings


def file_record(path: str | Path, folder: str | Path | None = None) -> InputRecord:
    """An input file: its sha256 and its path relative to `folder` (the output's, so `--from` finds it from any
    working directory)."""
    return InputRecord(content_hash(path), _relative(path, folder))


def bytes_record(data: bytes) -> InputRecord:
    """An input known only by its bytes (a request's base64 or URL): its sha256."""
    return InputRecord(hashlib.sha256(data).hexdigest())


def _named(source: str, folder: str | Path | None) -> str:
    """An adapter's source: a local path relative to `folder`, a hub id as it is."""
    return _relative(source, folder) if Path(source).expanduser().exists() else source


def _relative(path: str | Path, folder: str | Path | None) -> str:
    if folder is None:
        return str(path)
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return os.path.abspath(path)


def without_opaque_alpha(image: Image.Image) -> Image.Image:
    """The model is RGBA-native, so every render came back RGBA: an opaque one is RGB, as a masked edit of an RGB
    input is, and transparency is kept wherever the model made some (a cut-out, a sticker). Lossless: only an alpha
    of 255 everywhere is dropped."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema()[0] == 255:
        return image.convert("RGB")
    return image


class Generator:
    """Wraps a loaded `QwenImage21Pipeline` (with or without adapters) and samples from it.

    `guidance_scale` is the pipeline's `true_cfg_scale`: classifier-free guidance that only runs when a negative
    prompt is given (and the scale is > 1); without one, the scale has no effect. Steps and guidance default to the
    pipeline's own defaults, read from its signature.
    """

    def __init__(self, pipeline, resolution: int = 1024, model: ModelConfig | None = None):
        self.pipe = pipeline
        self.resolution = resolution
        # What `describe` names: the config it was loaded from, else what the pipeline says of itself.
        self.model = model or ModelConfig(pretrained=str(pipeline.name_or_path))
        self.adapters = Adapters(pipeline)
        defaults = inspect.signature(type(pipeline).__call__).parameters
        self.default_steps = defaults["num_inference_steps"].default
        self.default_guidance = defaults["true_cfg_scale"].default
        self.last_blend: masking.LatentBlend | None = None  # the latest masked edit's blend, for inspection

    @classmethod
    def from_pretrained(
        cls, pretrained, dtype="bfloat16", device=None, resolution: int = 1024, revision: str | None = None
    ) -> "Generator":
        """The base model, eager, with diffusers' default attention (`from_config` takes the config's settings)."""
        return cls.from_config(
            ModelConfig(pretrained=str(pretrained), dtype=dtype, revision=revision), device, resolution
        )

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, device=None, resolution: int = 1024) -> "Generator":
        """Load the base model once as `model.*` says (weights, attention path, compile mode); adapters then come
        and go via `self.adapters`."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(qmodel.load_model(model_cfg, device), resolution, model_cfg)

    def warm_up(self, steps: int = 2) -> float:
        """Compile before the first user does: a text-to-image and a one-reference edit at two aspect ratios, so
        the static graph, the one dynamic-shape recompile and the edit's segment layout are all built now. Returns
        the seconds it took; nothing to do (0.0) when the model is not compiled."""
        if not speed.is_compiled(self.pipe.transformer):
            return 0.0
        start = time.perf_counter()
        reference = Image.new("RGB", size_for_aspect("1:1", self.resolution), (128, 128, 128))
        for aspect in ("1:1", "16:9"):
            self.generate(GenerationRequest(prompt="warm-up", aspect_ratio=aspect, num_inference_steps=steps))
            self.generate(
                GenerationRequest(prompt="warm-up", images=[reference], aspect_ratio=aspect, num_inference_steps=steps)
            )
        return time.perf_counter() - start

    def count_tokens(self, text: str) -> int:
        return len(self.pipe.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check(self, request: GenerationRequest) -> Image.Image | None:
        """The checks that need no denoising: the sampling rules, prompt length, image count and aspects, mask.
        Raises ValueError naming the field; returns the prepared mask (None without one), so `generate` prepares it
        once."""
        request.check()
        if not request.prompt:  # the API rendered "" where every other edge asks for a prompt
            raise SettingError("prompt", "give the prompt")
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name)
            # Byte-level BPE: a token spans at least one UTF-8 byte, so short texts need no tokenizing.
            if text is not None and len(text.encode()) > MAX_PROMPT_TOKENS:
                n = self.count_tokens(text)
                if n > MAX_PROMPT_TOKENS:
                    raise InputError(
                        f"{name}: {n} tokens with the model's tokenizer; the limit is {MAX_PROMPT_TOKENS}", name
                    )
        check_image_count(len(request.images))
        check_input_aspects(request.images, self.resolution)
        return self._mask(request)

    def check_limits(self, request: GenerationRequest, max_side: int, max_steps: int, where: str) -> None:
        """Refuse a request whose render would pass `max_side` or `max_steps` (a deployment's limits, named by
        `where`), though every field it gave is within them: one side given sets the other from the image's aspect, an
        aspect preset or no size sets both from the pixel budget, and omitted steps are the pipeline's."""
        if request.num_inference_steps is None and self.default_steps > max_steps:  # a given one: refused before
            raise SettingError("num_inference_steps", f"omitted, it is the pipeline's {self.default_steps}, above "
                                                      f"{where}.max_steps ({max_steps}); give num_inference_steps <= "
                                                      f"{max_steps}")  # fmt: skip
        width, height = self._size(request)
        if max(width, height) <= max_side:
            return
        given = [name for name in ("aspect_ratio", "width", "height") if getattr(request, name) is not None]
        how = f"{getattr(request, given[0])} gives" if given else "with no size given, the pixel budget gives"
        raise SettingError(given[0] if given else "width", f"{how} {width}x{height}, past {where}.max_side "
                                                           f"({max_side}); give width and height <= {max_side}",
                           ("width", "height"))  # fmt: skip

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> Image.Image:
        mask = self.check(request)
        if request.guidance_unused():  # said to the caller (an HTTP client's x-warning), not taken silently
            log.warning("%s; rendered without guidance", GUIDANCE_UNUSED)
        if request.negative_unused():  # diffusers said it in its own words, on the console alone
            log.warning("%s; rendered without it", NEGATIVE_UNUSED)
        if request.adapters is not None:
            self.adapters.set(request.adapters)
        width, height = self._size(request)
        kwargs = dict(
            prompt=request.prompt,
            negative_prompt=None if request.negative_unused() else request.negative_prompt,
            true_cfg_scale=self.guidance(request),
            width=width,
            height=height,
            num_inference_steps=request.num_inference_steps or self.default_steps,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_resolution=self.resolution,
        )
        if request.images:
            kwargs["image"] = [qmodel.to_rgba(im) for im in request.images]
        if mask is not None:
            self.last_blend = masking.LatentBlend(self.pipe, request.images[-1], mask, width, height, request.seed)
            kwargs.update(callback_on_step_end=self.last_blend, callback_on_step_end_tensor_inputs=["latents"])
        image = self.pipe(**kwargs).images[0]
        if mask is not None:  # the input's mode: an RGB product stays RGB
            return masking.composite(image, request.images[-1], mask, request.mask_feather)
        image = without_opaque_alpha(image)
        if request.images and request.keep_input_size and not (request.width or request.height or request.aspect_ratio):
            # The model ran at the nearest supported size; give the catalogue image its own size back.
            image = image.resize(request.images[-1].size, Image.Resampling.LANCZOS)
        return image

    def describe(
        self,
        request: GenerationRequest,
        inputs: list[InputRecord] = (),
        mask: InputRecord | None = None,
        folder: str | Path | None = None,
    ) -> dict:
        """What `generate(request)` used, as the JSON-able block written into the image: the values that acted (the
        pipeline's steps when none were given, guidance 1.0 without a negative prompt, a text-to-image's size as
        sampled; an edit's size fields as given, since its size follows its inputs), the model, the adapters (with
        their files' sha256; their source relative to `folder`, the output's, or none without one: the API's
        adapters are the server's files, and a local model folder is named alone) and the inputs (`inputs`, `mask`:
        `file_record`s or `bytes_record`s)."""
        sampling = {f.name: getattr(request, f.name) for f in dataclasses.fields(SamplingConfig)}
        if not request.images:
            (sampling["width"], sampling["height"]), sampling["aspect_ratio"] = self._size(request), None
        sampling.update(num_inference_steps=request.num_inference_steps or self.default_steps,
                        guidance_scale=self.guidance(request))  # fmt: skip
        if request.negative_unused():
            sampling["negative_prompt"] = None
        weights = request.adapters if request.adapters is not None else (self.adapters.fused or self.adapters.active)
        loras = []
        for name, weight in weights.items():
            adapter = self.adapters.loaded[name]
            path = None if folder is None else _named(adapter.given, folder)
            loras.append(AdapterRecord(name, weight, adapter.sha256, path))
        dtype = str(self.pipe.transformer.dtype).removeprefix("torch.")
        pretrained = self.model.pretrained
        if Path(pretrained).expanduser().exists():
            # The API's images reach clients: a local folder by its name, not the server's path (its adapters go by
            # sha256 alone); the CLI's and batch's keep the path `--from` replays.
            local = Path(os.path.abspath(Path(pretrained).expanduser()))
            pretrained = str(local) if folder is not None else local.name
        model = ModelRecord(pretrained, self.model.revision, dtype)
        made = ImageSettings(**sampling, prompt=request.prompt, model=model, resolution=self.resolution, loras=loras,
                             images=list(inputs) if request.images else [],
                             mask=mask if request.mask is not None else None,
                             mask_feather=request.mask_feather if request.mask is not None else None)  # fmt: skip
        block = {"prompt": request.prompt} | dataclasses.asdict(made)  # the prompt first, for a person reading it
        del block["quality"]  # the file's encoding: `image_files.settings_as_written` adds it to a JPEG's or WebP's
        return block

    def layers(
        self,
        request: GenerationRequest,
        mask: Image.Image | str,
        background_prompt: str | None = None,
        elements: list[layer_output.Element] | None = None,
    ) -> layer_output.Layers:
        """Subject cut-out, background without it, generated elements: see `inference/layers.py`."""
        return layer_output.build_layers(self, request, mask, background_prompt, list(elements or []))

    def guidance(self, settings: SamplingConfig) -> float:
        """The guidance scale that acts for `settings` (a request, a batch job): what images and manifests record."""
        if settings.negative_prompt is None or settings.negative_unused():
            return 1.0  # guidance acts only against a negative prompt, and only above 1; the rest only warns
        return self.default_guidance if settings.guidance_scale is None else settings.guidance_scale

    @staticmethod
    def _mask(request: GenerationRequest) -> Image.Image | None:
        if request.mask is None:
            return None
        if not request.images:
            raise InputError("mask: a mask needs an image to edit; give the image the mask belongs to", "mask")
        return prepare_mask(request.mask, request.images[-1].size)

    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        """The size to sample at, for a request that passed `check` (the sampling rules)."""
        if request.aspect_ratio is not None:
            return size_for_aspect(request.aspect_ratio, self.resolution)
        # Edits run at the last reference image's aspect within the budget (the pipeline's own rule); text-to-image
        # is square. One side given: the other keeps that aspect (was: the budget's side, a 1.5:1 photo at --width 256
        # came out 2.67:1).
        w, h = request.images[-1].size if request.images else (1, 1)
        if request.width is not None and request.height is not None:
            return request.width, request.height
        if (one_side := one_side_size(request, (w, h))) is not None:
            return one_side
        return qmodel.fit_size(w, h, self.resolution) if request.images else (self.resolution, self.resolution)
