"""Build a tiny, random, seed-deterministic Qwen-Image-2.1 checkpoint on disk.

The folder has the exact diffusers layout of `Qwen/Qwen-Image-2.1` (model_index.json, transformer/, vae/,
text_encoder/, processor/ with the tokenizer inside, scheduler/), so every test and the demo load it through
the same `from_pretrained` path a real user takes. Nothing is downloaded: the BPE tokenizer is trained here on
a small built-in corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qwen_image_lora.io import atomic_dir

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

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
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_components(seed: int = 0, full_transformer: bool = False) -> dict:
    """Instantiate every pipeline component with tiny random weights (deterministic for a given seed).

    `full_transformer=True` gives the transformer the real 7B default config (and the encoders the matching
    64 latent channels and 4096-wide embeddings), for measuring training on a GPU without downloading weights."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    # z_dim must not be 4: the pipeline treats a 4-channel condition image as already-encoded latents.
    z_dim, text_dim = (64, 4096) if full_transformer else (8, 32)
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
    torch.manual_seed(seed + 1)
    # Five dim_mult stages = four downsamples = the 16x spatial compression the pipeline assumes.
    vae = AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
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


def make_tiny_model(
    output_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False, full_transformer: bool = False
) -> Path:
    """Write the tiny checkpoint folder (atomically: a temp folder renamed into place) and return its path."""
    from diffusers import QwenImage21Pipeline

    output_dir = Path(output_dir)
    if (output_dir / "model_index.json").exists() and not overwrite:
        return output_dir
    with atomic_dir(output_dir) as tmp:
        components = build_tiny_components(seed, full_transformer)
        if full_transformer:
            components["transformer"].to(torch.bfloat16)  # 14 GB on disk instead of 28
        QwenImage21Pipeline(**components).save_pretrained(tmp)
    return output_dir
