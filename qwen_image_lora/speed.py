"""How the transformer runs, not what it computes: the block-causal attention path (`model.attention`), diffusers'
attention backend for the calls without a block-causal mask (`model.attention_backend`) and torch.compile
(`model.compile`). One place sets them for training, previews, eval and serving."""

from __future__ import annotations

import torch

from qwen_image_lora.errors import InputError

# The block-causal attention paths (`model.attention`) and compile modes (`model.compile`): see `configure_transformer`.
ATTENTION_PATHS = ("sdpa-segments", "flex")
COMPILE_MODES = (False, "blocks", "full")  # False, not "off": YAML 1.1 reads an unquoted `off` as false
# Each distinct compiled variant (grad or not, KV-cache mode, active adapter set, a static then a dynamic shape)
# counts towards torch's per-function recompile limit (8); past it a block silently runs eager.
RECOMPILE_LIMIT = 64


def configure_transformer(
    transformer, attention: str = "sdpa-segments", attention_backend: str | None = None, compile: str | bool = False
) -> None:
    """Install the attention path and compile mode; the one place training, previews, eval and serving set them.

    attention  "sdpa-segments": diffusers' default processor, one SDPA call per block-causal segment (exact,
               needs no compiler). "flex": one `flex_attention` call with a BlockMask, padding included; it must
               be compiled (uncompiled it builds the fp32 score matrix) and has no backward on CPU.
    attention_backend  diffusers' dispatcher backend for the calls without a block-causal mask (the KV-cached
               denoising steps), e.g. "_native_flash", "_native_cudnn", "flash", "sage"; None keeps "native".
    compile    "blocks": `compile_repeated_blocks`, one compiled graph shared by every block (fast to compile);
               "full": the whole transformer. Compilation is lazy (the first call pays) and uses torch's automatic
               dynamic shapes: the first shape compiles static, the first different bucket recompiles once with a
               symbolic sequence length, and later buckets reuse it. Training calls it after LoRA and
               checkpointing are in place, before DDP wrapping; at inference each new set of active adapters
               recompiles once (their weights are dynamic after the first change).
    """
    from diffusers.models.attention_dispatch import AttentionBackendName  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them
    from diffusers.models.transformers.transformer_qwenimage21 import (  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them
        QwenImage21AttnProcessor,
        QwenImage21FlexAttnProcessor,
    )

    check_speed_settings(attention, attention_backend, compile)
    transformer.set_attn_processor(
        QwenImage21FlexAttnProcessor() if attention == "flex" else QwenImage21AttnProcessor()
    )
    if attention_backend is not None:
        try:
            transformer.set_attention_backend(AttentionBackendName(attention_backend).value)
        except (ImportError, RuntimeError, ValueError) as e:  # a backend whose package or hardware is missing
            raise InputError(
                f"model.attention_backend: {attention_backend} is not usable here: {e}", "model.attention_backend"
            ) from e
    if compile:
        import torch._dynamo  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them
        import torch._functorch.config  # noqa: PLC0415 - as torch._dynamo above

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # torch 2.14.1: a dynamic-shape graph saved the text segment's value slice for backward, and its compiled
        # backward took that slice's stride as fixed at the length it compiled for; the third distinct prompt
        # length failed an inductor stride assert mid-run. Saving the base and replaying the slice avoids it.
        torch._functorch.config.recompute_views = True
        if compile == "blocks":
            transformer.compile_repeated_blocks()
        else:  # the forward, not the module: hooks stay outside the graph (and the state dict keeps its names)
            transformer.forward = torch.compile(transformer.forward)
        transformer.register_forward_pre_hook(_eager_kv_prefill, with_kwargs=True)


def is_compiled(transformer) -> bool:
    """Whether `configure_transformer` compiled it: its repeated blocks, or its whole forward."""
    return hasattr(transformer.forward, "_torchdynamo_orig_callable") or any(
        getattr(block, "_compiled_call_impl", None) is not None for block in transformer.transformer_blocks
    )


def _eager_kv_prefill(module, args, kwargs):
    """Run the sampler's KV-prefill step (its first) eager: its graph bakes in the prompt's token count (the cache
    slice), so compiling it would recompile for every new prompt length. The cached steps, training and
    uncached calls run compiled."""
    torch.compiler.set_stance("force_eager" if kwargs.get("kv_cache_mode") == "extract" else "default")


def check_speed_settings(attention: str, attention_backend: str | None, compile: str | bool) -> None:
    """Raise ValueError naming the `model.*` field that cannot work (before any weights load); the config checks
    the combinations, this the names a caller outside a config may pass."""
    from diffusers.models.attention_dispatch import AttentionBackendName  # noqa: PLC0415 - diffusers and transformers take seconds to import: validate, plan and the CLI's checks run without them

    if attention not in ATTENTION_PATHS:
        raise InputError(
            f"model.attention: {attention!r} is not one of {', '.join(ATTENTION_PATHS)}", "model.attention"
        )
    if compile not in COMPILE_MODES:
        raise InputError(f"model.compile: {compile!r} is not one of false, blocks, full", "model.compile")
    backends = [b.value for b in AttentionBackendName]
    if attention_backend is not None and attention_backend not in backends:
        raise InputError(
            f"model.attention_backend: {attention_backend!r} is not a diffusers attention backend; "
            f"one of {', '.join(backends)}"
        )
