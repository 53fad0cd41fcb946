"""Build a tiny, random, seed-deterministic Qwen-Image-2.1 checkpoint on disk.

The folder has the exact diffusers layout of `Qwen/Qwen-Image-2.1` (model_index.json, transformer/, vae/,
text_encoder/, processor/ with the tokenizer inside, scheduler/), so every test and the demo load it through
the same `from_pretrained` path a real user takes. Nothing is downloaded: the BPE tokenizer is trained here on
a small built-in corpus.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
)
from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import _patchify
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from qwen_image_lora.console import quiet_progress_bars
from qwen_image_lora.io import atomic_dir, check_ours_to_write

# Real Qwen special tokens, in the order Qwen2.5/3 tokenizers number them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Renders both plain-string and list-of-parts message content: the pipeline counts system tokens by rendering
# a list-of-parts system message, and an empty render would leave the prompt embeddings empty.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_WORDS = (
    "a photo of the product on a white background studio lighting soft shadow brand logo red blue green "
    "yellow orange purple black white bottle can box bag shoe watch mug lamp chair sneaker perfume label "
    "text reads sale new premium bold typography poster banner minimal clean modern vintage flat lay "
    "close up macro wide shot marble wood concrete table kitchen beach forest city night sunset replace "
    "the background with change make it add remove turn into keep same color style sks qwnbrand trigger "
    "Comprehend and analyze the provided prompt. Describe image picture 1 2 3 4 5 6 7 8 9 0 , . ! ? ' \" :"
)


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE with Qwen's pre-tokenizer, trained offline on a small corpus."""

    corpus = [_CORPUS_WORDS, _CORPUS_WORDS.upper(), _CORPUS_WORDS.title()] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    vocab = bpe.get_vocab()
    # The trained merges are only reachable through the serialized model.
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# The tiny VAE is built, not trained: a fixed linear code of each 16x16 tile (the mean of each RGBA channel over an
# n x n grid of sub-blocks, z_dim = 4 n^2), laid into AutoencoderKLQwenImage21's own layers. Its `patch_size=16`
# turns a tile into one position's 1024 channels, every residual branch is zeroed (identity), and the one
# non-linear step left on the path (RMS norm -> SiLU at each head) is made linear by carrying each value as a
# (+, -) pair around a positive offset next to a large constant channel: the norm then divides by a near-constant
# and SiLU works where it is ~x. Reconstruction is exact up to the sub-block mean (float32; bf16 is coarse).
_PATCH = 16
_OFFSET, _CONSTANT, _SPREAD, _SILU_SCALE = 1.0, 100.0, 0.2, 20.0  # beta, K, a, lambda in the comments below
_PIXEL_STD = 0.5  # sub-block means in [-1, 1] -> normalised latents of about unit spread


def _latent_stats(z_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic, far from 0 / 1 `latents_mean` / `latents_std`, so a skipped normalisation shows."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(z_dim, generator=g)
    std = 0.5 + 2.5 * torch.rand(z_dim, generator=g)
    return mean, std


def _tile_code(z_dim: int) -> torch.Tensor:
    """[z_dim, 1024] 0/1 masks, in the VAE's patchified channel order: latent c*n^2 + i*n + j is the
    (i, j) sub-block of colour channel c."""

    n = math.isqrt(z_dim // 4)
    if 4 * n * n != z_dim or _PATCH % n:
        raise ValueError(f"z_dim {z_dim}: the tiny VAE needs 4 * n^2 channels with n dividing {_PATCH}")
    side = _PATCH // n
    masks = torch.zeros(4, n, n, 4, _PATCH, _PATCH)
    for c in range(4):
        for i in range(n):
            for j in range(n):
                masks[c, i, j, c, i * side : (i + 1) * side, j * side : (j + 1) * side] = 1
    return _patchify(masks.reshape(z_dim, 4, 1, _PATCH, _PATCH), _PATCH).reshape(z_dim, 4 * _PATCH * _PATCH)


def build_reconstructing_vae(z_dim: int, seed: int):
    """An AutoencoderKLQwenImage21 whose decode(encode(x)) is x averaged over sub-blocks of each 16x16 tile.

    Raw latent k = latents_mean[k] + latents_std[k] * m_k / _PIXEL_STD, with m_k the sub-block mean in [-1, 1],
    so the normalised latents the transformer sees are m_k / _PIXEL_STD, whatever the (non-trivial) stats."""

    mean, std = _latent_stats(z_dim, seed)
    width = 2 * z_dim + 1  # (+, -) pairs and the constant channel
    vae = AutoencoderKLQwenImage21(
        base_dim=width,
        decoder_base_dim=width,
        z_dim=z_dim,
        dim_mult=[1],  # no down/upsampling: the 16x16 patchify is the whole spatial compression
        num_res_blocks=0,
        attn_scales=[],
        temperal_downsample=[],
        latents_mean=mean.tolist(),
        latents_std=std.tolist(),
        in_channels=4 * _PATCH * _PATCH,
        out_channels=4 * _PATCH * _PATCH,
        patch_size=_PATCH,
    )
    code = _tile_code(z_dim)
    side2 = code.sum(1, keepdim=True)  # pixels per sub-block
    # After the norm, channel 2k / 2k+1 holds about (beta +/- a m_k) * lambda; gamma sets lambda (norm of the
    # offsets: sqrt(K^2 + 2 z beta^2), times sqrt(width) from the norm's own scale).
    gamma = _SILU_SCALE * math.sqrt(_CONSTANT**2 + 2 * z_dim * _OFFSET**2) / math.sqrt(width)
    pair_gain = 1.0 / (2 * _SPREAD * _SILU_SCALE)  # (y+ - y-) -> m
    scale = std / _PIXEL_STD  # m -> raw latent, around `mean`
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()  # every residual branch and attention projection off: blocks are identities
        for norm in (vae.encoder.norm_out, vae.decoder.norm_out):
            norm.gamma.fill_(gamma)
        vae.quant_conv.weight[:, :, 0, 0] = torch.eye(2 * z_dim)
        vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(z_dim)

        enc_in, enc_out = vae.encoder.conv_in, vae.encoder.conv_out
        enc_in.weight[0 : 2 * z_dim : 2, :, 1, 1] = _SPREAD * code / side2
        enc_in.weight[1 : 2 * z_dim : 2, :, 1, 1] = -_SPREAD * code / side2
        enc_in.bias[: 2 * z_dim] = _OFFSET
        enc_in.bias[-1] = _CONSTANT
        for k in range(z_dim):
            enc_out.weight[k, 2 * k, 1, 1] = pair_gain * scale[k]
            enc_out.weight[k, 2 * k + 1, 1, 1] = -pair_gain * scale[k]
        enc_out.bias[:z_dim] = mean
        enc_out.bias[z_dim:] = -20.0  # log-variance: a near-deterministic posterior, sample ~ mode

        dec_in, dec_out = vae.decoder.conv_in, vae.decoder.conv_out
        for k in range(z_dim):
            dec_in.weight[2 * k, k, 1, 1] = _SPREAD / scale[k]
            dec_in.weight[2 * k + 1, k, 1, 1] = -_SPREAD / scale[k]
        dec_in.bias[0 : 2 * z_dim : 2] = _OFFSET - _SPREAD * mean / scale
        dec_in.bias[1 : 2 * z_dim : 2] = _OFFSET + _SPREAD * mean / scale
        dec_in.bias[-1] = _CONSTANT
        dec_out.weight[:, 0 : 2 * z_dim : 2, 1, 1] = pair_gain * code.T
        dec_out.weight[:, 1 : 2 * z_dim : 2, 1, 1] = -pair_gain * code.T
    return vae


def build_downsampling_vae(z_dim: int, seed: int):
    """A random (not reconstructing) AutoencoderKLQwenImage21 of the real checkpoint's geometry: four 2x
    downsamplings and no patchify, where the reconstructing VAE patchifies 16x16 tiles. Both give the same latent
    grid and channels. diffusers' example script accepts only this geometry (2 ** len(temperal_downsample) must be
    16); it is for running that script on the tiny checkpoint, not for looking at images."""

    mean, std = _latent_stats(z_dim, seed)
    torch.manual_seed(seed + 1)
    return AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1] * 5, num_res_blocks=0, attn_scales=[],
        temperal_downsample=[False] * 4, latents_mean=mean.tolist(), latents_std=std.tolist(),
    )  # fmt: skip


def build_tiny_components(seed: int = 0, full_transformer: bool = False, downsampling_vae: bool = False) -> dict:
    """Instantiate every pipeline component with tiny random weights (deterministic for a given seed).

    `full_transformer=True` gives the transformer the real 7B default config (and the encoders the matching
    64 latent channels and 4096-wide embeddings), for measuring training on a GPU without downloading weights.
    `downsampling_vae=True`: `build_downsampling_vae` instead of the reconstructing VAE."""

    # z_dim must not be 4: the pipeline treats a 4-channel condition image as already-encoded latents.
    z_dim, text_dim = (64, 4096) if full_transformer else (16, 32)
    tokenizer = _train_tokenizer(vocab_size=600)

    torch.manual_seed(seed)
    if full_transformer:
        transformer = QwenImage21Transformer2DModel()
    else:
        transformer = QwenImage21Transformer2DModel(
            in_channels=z_dim,
            out_channels=z_dim,
            num_layers=2,
            attention_head_dim=16,  # axes_dims_rope must sum to it
            num_attention_heads=2,
            context_in_dim=text_dim,
            mlp_ratio=2,
            axes_dims_rope=(4, 6, 6),
        )
    vae = (build_downsampling_vae if downsampling_vae else build_reconstructing_vae)(z_dim, seed)
    torch.manual_seed(seed + 2)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_dim,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": text_dim,
            # One merged vision token covers 32 px = the 2x2 latent group a vision slot expands into.
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    text_encoder = Qwen3VLForConditionalGeneration(config).eval()

    # min/max_pixels wide enough that the processor never resizes a condition image the pipeline already sized:
    # a resize here changes the number of vision slots and breaks the slot/latent correspondence.
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=2048 * 2048
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        chat_template=CHAT_TEMPLATE,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "processor": processor,
        "scheduler": scheduler,
    }


def is_model_folder(folder: str | os.PathLike) -> bool:
    """`folder` holds a diffusers model (its model_index.json, which save_pretrained writes)."""
    return (Path(folder) / "model_index.json").exists()


def make_tiny_model(
    output_dir: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
    full_transformer: bool = False,
    downsampling_vae: bool = False,
) -> Path:
    """Write the tiny checkpoint folder (atomically: a temp folder renamed into place) and return its path; a folder
    that holds a model already is kept unless `overwrite`, one that holds anything else is refused. The other options
    are `build_tiny_components`'."""

    output_dir = Path(output_dir)
    made = is_model_folder(output_dir)
    if made and not overwrite:
        return output_dir
    check_ours_to_write(output_dir, "a model", made)  # atomic_dir swaps out the whole folder
    with atomic_dir(output_dir) as tmp:
        components = build_tiny_components(seed, full_transformer, downsampling_vae)
        if full_transformer:
            components["transformer"].to(torch.bfloat16)  # 14 GB on disk instead of 28
        with quiet_progress_bars():
            QwenImage21Pipeline(**components).save_pretrained(tmp)
    return output_dir
