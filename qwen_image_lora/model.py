"""Everything model-specific about Qwen-Image-2.1 lives here: loading the components, image <-> latent
conversion (VAE normalisation, packing), prompt encoding, and one transformer call laid out exactly as
`QwenImage21Pipeline.__call__` lays it out. Training, caching, evaluation and inference all go through these
functions, so what the adapter is trained on is what it sees at inference.

Shapes (latent units: one latent = 16x16 pixels; one vision slot of the text encoder = 2x2 latents):
    pixels      [B, 4, 1, H, W]   RGBA in [-1, 1] (the 2.1 VAE is RGBA-native; RGB gets alpha = 1)
    latents     [B, C, 1, h, w]   normalised by the VAE's latents_mean/std, h = H/16, w = W/16
    packed      [B, h*w, C]       what the transformer consumes
    embeds      [B, L, D]         Qwen3-VL hidden states, system prefix dropped, right-padded
    embeds_mask [B, L] bool or None (None = nothing padded)
    image_pad   [B, L] bool       True at the encoder's vision slots of the condition images
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from qwen_image_lora.console import QUIET_LOAD_BYTES, quiet_progress_bars, weights_bytes
from qwen_image_lora.errors import InputError
from qwen_image_lora.hub import TRANSFORMER_SUBFOLDER, check_pretrained, transformer_config_json
from qwen_image_lora.io import is_write_error
from qwen_image_lora.presets import SIDE_MULTIPLE
from qwen_image_lora.quantization import check_quantize, quantization_config
from qwen_image_lora.speed import configure_transformer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LATENT_PIXELS = 16  # the VAE compresses 16x spatially
# ComfyUI's Qwen-Image-2.1 model stores each block's SwiGLU halves as one linear, gate rows first:
# fused name -> the diffusers modules in its row order (what adapter exports for ComfyUI must fuse).
COMFYUI_FUSED_LINEARS = {"img_mlp.gate_up": ("img_mlp.gate_layer", "img_mlp.proj")}


def load_pipeline(
    pretrained: str | Path,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device | None = None,
    *,
    revision: str | None = None,
    text_encoder: bool = True,
    vae: bool = True,
    transformer: bool = True,
    quantize: str = "none",
):
    """Load the Qwen-Image-2.1 components from a hub id or a local diffusers folder and build the pipeline.

    Each component goes through its own standard `from_pretrained`, so a tiny local checkpoint and
    `Qwen/Qwen-Image-2.1` take the same path. `text_encoder=False` / `vae=False` skip those weights (for
    training from cached latents and embeddings); `transformer=False` skips the 7B denoiser (for encoding only).
    `quantize` (`model.quantize`, for training) stores the transformer's block linears quantized.
    """
    check_quantize(quantize)
    check_pretrained(pretrained, revision)  # a mistyped folder fails here, before seconds of imports and weight loading
    from diffusers import QwenImage21Pipeline  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    source = str(pretrained)
    common = {"revision": revision}
    size = weights_bytes(source)
    with quiet_progress_bars(size is not None and size < QUIET_LOAD_BYTES):
        components = _load_components(
            source, dtype, common, text_encoder=text_encoder, vae=vae, transformer=transformer, quantize=quantize
        )
    pipe = QwenImage21Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def _load_components(
    source: str,
    dtype: torch.dtype,
    common: dict,
    *,
    text_encoder: bool,
    vae: bool,
    transformer: bool,
    quantize: str = "none",
) -> dict:
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them

    loaders = {  # each from its own subfolder, named as the component
        "transformer": lambda: load_transformer(source, dtype, quantize, **common) if transformer else None,
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **common),
        "processor": lambda: Qwen3VLProcessor.from_pretrained(source, subfolder="processor", **common),
        "vae": lambda: (
            AutoencoderKLQwenImage21.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common)
            if vae
            else None
        ),
        "text_encoder": lambda: (
            Qwen3VLForConditionalGeneration.from_pretrained(
                source, subfolder="text_encoder", dtype=dtype, **common
            ).eval()
            if text_encoder
            else None
        ),
    }
    components = {}
    for name, load in loaders.items():
        try:
            components[name] = load()
        except (OSError, ValueError) as e:  # the libraries' words for a missing, truncated or unreadable file
            if isinstance(e, OSError) and is_write_error(e):
                raise  # a full disk while the hub downloads: the commands name it as such
            raise damaged_model(source, name, e) from e
    return components


def damaged_model(source: str, component: str, error: Exception) -> InputError:
    """A model that passed `check_pretrained` but does not load: one line naming it, the component, what the library
    found, and how to get a whole copy (it was diffusers' or transformers' traceback)."""
    found = (str(error).strip().splitlines() or [type(error).__name__])[0]
    again = (
        "copy or download it again (`qwen-lora make-tiny-model DIR` writes a tiny test one)"
        if Path(source).expanduser().exists()
        else f"`hf download {source}` completes it"
    )
    return InputError(
        f"model.pretrained: {source} could not be loaded: its {component} is incomplete or damaged ({found}); {again}",
        "model.pretrained",
    )


def load_transformer(source: str, dtype: torch.dtype, quantize: str = "none", **common):
    """The denoiser from a hub id or a diffusers folder, its block linears quantized as `quantize` says."""
    config = None if quantize == "none" else quantization_config(quantize, dtype)
    return transformer_class().from_pretrained(
        source, subfolder=TRANSFORMER_SUBFOLDER, torch_dtype=dtype, quantization_config=config, **common
    )


def load_model(model_cfg, device=None, **components):
    """The config's model (`model.*`): its weights, then its attention path and compile mode. What every command
    that samples (generate, edit, batch, serve, eval) loads; training adds LoRA first (`speed.configure_transformer`)."""
    pipe = load_pipeline(model_cfg.pretrained, model_cfg.dtype, device, revision=model_cfg.revision, **components)
    if pipe.transformer is not None:
        configure_transformer(pipe.transformer, model_cfg.attention, model_cfg.attention_backend, model_cfg.compile)
    return pipe


def transformer_class():
    """The denoiser's class (deferred import: loading diffusers' model registry costs seconds at start-up)."""
    from diffusers import QwenImage21Transformer2DModel  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them

    return QwenImage21Transformer2DModel


def pipeline_class():
    """The pipeline's class; its LoRA loader reads, converts and saves adapter files (deferred import, as above)."""
    from diffusers import QwenImage21Pipeline  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them

    return QwenImage21Pipeline


def meta_transformer(pretrained: str | None, revision: str | None = None):
    """The transformer's module tree on the meta device, from its config.json alone (`load_transformer_config`): its
    module names and layer shapes, no weights, no memory (the 7B tree builds in about 2 s on CPU)."""
    with torch.device("meta"):
        return transformer_class()(**load_transformer_config(pretrained, revision))


def transformer_blocks(transformer) -> torch.nn.ModuleList:
    """The repeated blocks, in order (what gradient checkpointing and the memory planner count)."""
    return transformer.transformer_blocks


def real_transformer_config() -> dict[str, Any]:
    """The 7B Qwen-Image-2.1 transformer's config: the class defaults are the released model's."""
    sig = inspect.signature(transformer_class().__init__)
    return {k: p.default for k, p in sig.parameters.items() if k != "self"}


def load_transformer_config(pretrained: str | None, revision: str | None = None) -> dict[str, Any]:
    """The transformer's `config.json` from a local folder or the hub cache, without weights; the real
    model's defaults when neither is available (the planner never downloads)."""
    found = transformer_config_json(pretrained, revision)
    return real_transformer_config() if found is None else _init_kwargs(found)


def _init_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    known = real_transformer_config()
    return {**known, **{k: v for k, v in config.items() if k in known}}


def load_captioner(pretrained: str | Path, dtype: torch.dtype | str, revision: str | None = None, device=None):
    """(model, processor): the checkpoint's Qwen3-VL text encoder with its language-model head, for captions."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    processor = Qwen3VLProcessor.from_pretrained(pretrained, subfolder="processor", revision=revision)
    size = weights_bytes(Path(pretrained) / "text_encoder")  # a bar only where loading takes a while, as the pipeline's
    with quiet_progress_bars(size is not None and size < QUIET_LOAD_BYTES):
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            pretrained, subfolder="text_encoder", dtype=dtype, revision=revision
        ).eval()
    if device is not None:
        model.to(device)
    return model, processor


def offload_encoders(pipe, device: torch.device) -> None:
    """Keep the text encoder and VAE in CPU memory, streaming their layers onto `device` only while they run
    (diffusers group offloading). Training from a complete cache then holds just the transformer on the GPU,
    while validation samples still go through the full pipeline."""
    from diffusers.hooks import apply_group_offloading  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them

    for module in (pipe.text_encoder, pipe.vae):
        if module is not None:
            module.to("cpu")
            apply_group_offloading(module, onload_device=device, offload_device="cpu", offload_type="leaf_level")


# ------------------------------------------------------------------------------------------ images


def fit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The one sizing rule: the pipeline's own (diffusers' `calculate_dimensions`), area ~ resolution^2 at this
    aspect, sides multiples of 32. Training buckets, generated edits and the pipeline's resize of every condition
    image use it, so an image trains at exactly the size the pipeline gives it at inference."""
    # Deferred: the pipeline module imports transformers and diffusers' pipelines (seconds).
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them

    w, h, _ = calculate_dimensions(resolution * resolution, width / height)
    return max(SIDE_MULTIPLE, w), max(SIDE_MULTIPLE, h)


# Qwen2-VL's image processor (`smart_resize`) refuses a condition image longer than this, after the sizing rule.
ENCODER_MAX_ASPECT = 200


def max_aspect(resolution: int) -> float:
    """The aspect (long side / short side) from which on the pipeline cannot size an input image at `resolution`:
    its rule (`calculate_dimensions`, area resolution^2) rounds each side to a multiple of 32, so a short side of
    16 px or less (resolution / sqrt(aspect)) becomes 0 and the resize fails. 4096:1 at 1024, 16:1 at 64."""
    return (resolution / (SIDE_MULTIPLE / 2)) ** 2


def to_rgba(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGBA" else image.convert("RGBA")


def image_to_pixels(pipe, image: Image.Image) -> torch.Tensor:
    """A PIL image already at its bucket size -> [1, 4, 1, H, W] in [-1, 1], as the pipeline preprocesses it."""
    w, h = image.size
    if w % SIDE_MULTIPLE or h % SIDE_MULTIPLE:
        raise ValueError(f"image size {w}x{h}: both sides must be multiples of {SIDE_MULTIPLE}")
    return pipe.image_processor.preprocess(to_rgba(image), width=w, height=h).unsqueeze(2)


@torch.no_grad()
def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 4, 1, H, W] pixels -> normalised latents [B, C, 1, H/16, W/16] (the posterior mode, like inference)."""
    vae = pipe.vae
    if vae is None:
        raise RuntimeError("the VAE was not loaded; load the pipeline with vae=True or use cached latents")
    # The execution device, not the VAE's: with offloading its weights rest on the CPU.
    pixels = pixels.to(device=pipe._execution_device, dtype=vae.dtype)
    return pipe._encode_vae_image(pixels, generator=None)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] -> [B, h*w, C]."""
    b, c, _, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] -> [B, C, 1, h, w]."""
    b, _, c = packed.shape
    return packed.transpose(1, 2).reshape(b, c, 1, h, w)


# ------------------------------------------------------------------------------------------ prompts


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # [B, L, D]
    mask: torch.Tensor | None  # [B, L] bool, None when nothing is padded
    image_pad: torch.Tensor  # [B, L] bool

    def to(self, device, dtype=None) -> "PromptEmbeds":
        return PromptEmbeds(
            self.embeds.to(device=device, dtype=dtype or self.embeds.dtype),
            None if self.mask is None else self.mask.to(device),
            self.image_pad.to(device),
        )


@torch.no_grad()
def encode_prompt(pipe, prompts: list[str], images: list[Image.Image] | None = None) -> PromptEmbeds:
    """Encode prompts (and, for edits, the shared condition images already at their bucket size) with the
    pipeline's own `encode_prompt`: its template, its alpha-on-white for the vision encoder, its empty-prompt
    handling. The images must be the ones whose latents the transformer gets, so the slots line up."""
    if pipe.text_encoder is None:
        raise RuntimeError(
            "the text encoder was not loaded; load the pipeline with text_encoder=True or use cached embeddings"
        )
    images = [to_rgba(im) for im in images] if images else None
    embeds, mask, image_pad = pipe.encode_prompt(prompt=list(prompts), image=images, device=pipe._execution_device)
    return PromptEmbeds(embeds, mask, image_pad)


def pad_prompt_embeds(items: list[PromptEmbeds]) -> PromptEmbeds:
    """Stack per-sample encodings (each [1, L_i, D]) into one right-padded batch."""
    length = max(p.embeds.shape[1] for p in items)
    embeds, masks, pads = [], [], []
    for p in items:
        n = p.embeds.shape[1]
        embeds.append(torch.nn.functional.pad(p.embeds, (0, 0, 0, length - n)))
        valid = p.mask.bool() if p.mask is not None else torch.ones(1, n, dtype=torch.bool, device=p.embeds.device)
        masks.append(torch.nn.functional.pad(valid, (0, length - n)))
        pads.append(torch.nn.functional.pad(p.image_pad.bool(), (0, length - n)))
    mask = torch.cat(masks)
    return PromptEmbeds(torch.cat(embeds), None if mask.all() else mask, torch.cat(pads))


def split_prompt_embeds(batch: PromptEmbeds) -> list[PromptEmbeds]:
    """The inverse of `pad_prompt_embeds`: a right-padded batch -> one [1, L_i, D] encoding per sample, cut to its own
    tokens, so each is what `encode_prompt` gives that prompt alone (mask None: nothing padded)."""
    lengths = [batch.embeds.shape[1]] * len(batch.embeds) if batch.mask is None else batch.mask.sum(1).tolist()
    return [
        PromptEmbeds(batch.embeds[i : i + 1, :n], None, batch.image_pad[i : i + 1, :n]) for i, n in enumerate(lengths)
    ]


# ------------------------------------------------------------------------------------------ transformer


def predict_velocity(
    transformer,
    noisy: torch.Tensor,
    prompt: PromptEmbeds,
    sigmas: torch.Tensor,
    cond_latents: list[torch.Tensor] | None = None,
    attention_kwargs: dict | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One transformer call, laid out as the pipeline lays it out. `dtype` is what the inputs are cast to (default:
    the transformer's; give it for a wrapped module, e.g. DDP, that has no `.dtype`).

    noisy        [B, C, 1, h, w]  noised target latents
    sigmas       [B]              flow-matching times in [0, 1] (the pipeline passes t/1000 = sigma)
    cond_latents list of [B, C, 1, h_i, w_i]  reference-image latents, in prompt order
    returns      [B, C, 1, h, w]  predicted velocity (noise - x0) on the target tokens only
    """
    b, _, _, h, w = noisy.shape
    dtype = dtype or transformer.dtype
    cond_latents = cond_latents or []
    hidden = torch.cat([*(pack(c) for c in cond_latents), pack(noisy)], dim=1)
    shapes = [(1, c.shape[3], c.shape[4]) for c in cond_latents] + [(1, h, w)]
    # One slot per 2x2 group of target latents is appended after the encoder's sequence.
    img_mask = torch.cat([prompt.image_pad.bool(), prompt.image_pad.new_ones(b, h * w // 4, dtype=torch.bool)], dim=1)
    out = transformer(
        hidden_states=hidden.to(dtype),
        timestep=sigmas.to(hidden.device, dtype),
        encoder_hidden_states=prompt.embeds.to(dtype),
        encoder_hidden_states_mask=prompt.mask,
        img_shapes=[shapes] * b,
        img_mask=img_mask,
        attention_kwargs=attention_kwargs,
        return_dict=False,
    )[0]
    return unpack(out[:, -h * w :], h, w)
