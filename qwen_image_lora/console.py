"""The console carries our lines and real problems only. Noise we cause is fixed where we cause it; what libraries
print about choices that are theirs, not the user's, is dropped here by its exact text, never by silencing a whole
logger or warning category (a real problem from the same library still shows)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

# bitsandbytes (imported by peft whenever it injects LoRA layers, whatever the optimizer) asks `kernels` for a CPU
# 4-bit kernel from the hub on CPUs with AVX512-BF16; offline, `kernels` logs this line on every command.
_KERNELS_LOGGER = "kernels._internals.hf_hub"
_KERNELS_TRUST = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because"
# diffusers injects each further adapter with peft's `inject_adapter_in_model`, which warns once a model already
# holds one: several adapters at once is this toolkit's normal case (weighted mixes, eval of checkpoints).
_PEFT_SECOND_ADAPTER = r"Already found a `peft_config` attribute in the model\. This will lead to having multiple"
# diffusers 0.42 looks for torchao tensor classes that torchao 0.18 moved; they matter only for loading checkpoints
# saved already quantized, which this toolkit never does (model.quantize quantizes at load).
_DIFFUSERS_LOGGER_TORCHAO = "diffusers.quantizers.torchao.torchao_quantizer"
_TORCHAO_CLASSES = "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized"
# ... and says int8 needs bfloat16 whenever another dtype loads, a hedge: in float32 (the tiny model's dtype) int8 trains
# within 3e-5 of unquantized and its adapter loads anywhere (tests/test_quantize.py). float16 still shows it.
_TORCHAO_INT8_FP32 = "You are trying to set torch_dtype to torch.float32 for integer quantization, but only bfloat16"
# torchao (imported by peft and diffusers whenever they look for quantized layers) registers its enums with torch's
# pytree, which torch 2.14 reports as deprecated, once per enum, on every command that loads an adapter.
_PYTREE_LOGGER = "torch.utils._pytree"
_ENUM_NOTICE = "is an Enum subclass and is now natively supported by torch.compile"
# transformers' tokenizer on a text past the model's context: the doctor and training count tokens themselves and name
# the caption (`caption-too-long`), prompts are refused over 1,024 tokens; its line came first, naming no file.
_TOKENIZER_LOGGER = "transformers.tokenization_utils_base"
_TOO_LONG = "Token indices sequence length is longer than the specified maximum sequence length for this model"
# diffusers' check after loading an adapter takes a key as this adapter's when the adapter's name is a substring of
# it: loading `run` after `run2` reported each key of run2 as "missing" from run (one ~3 KB line; the load is fine).
_PEFT_UTILS_LOGGER = "diffusers.utils.peft_utils"
_MISSING_KEYS = "Loading adapter weights from state_dict led to missing keys in the model:"
# matplotlib (the eval report's plots) builds its font list once per machine and says so at INFO, which our commands
# show: its own bookkeeping, not the user's.
_MATPLOTLIB_FONTS_LOGGER = "matplotlib.font_manager"
_NEW_FONT_MANAGER = "generated new fontManager"
# torch's compiler, once per compiled graph: it leaves the complex multiply of diffusers' rotary embedding to eager
# kernels ("Performance may be worse than eager"). A fact about the model's code, not a choice the user can change;
# `compile` is still faster (scripts/bench_speed.py).
_INDUCTOR_COMPLEX = "Torchinductor does not support code generation for complex operators"
# ... and, compiling on a machine without a GPU where a CUDA toolkit folder exists (CUDA_HOME), that it found no CUDA
# runtime: the CPU compile needs none.
_CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"
_NO_CUDA_RUNTIME = "No CUDA runtime is found, using CUDA_HOME="
# Weights smaller than this load in well under a second: a progress bar for them is noise.
# wandb.init's settings wherever a run starts: wandb still says where the run is (its URL, or its offline folder and
# `wandb sync`) and its warnings, but not the run-history charts and summary it draws at the end (~20 lines).
WANDB_SETTINGS = {"quiet": True}
QUIET_LOAD_BYTES = 256 * 2**20


class _DropExactMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class _DropTorchaoEnumNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        registered = record.args[0] if isinstance(record.args, tuple) and record.args else None
        from_torchao = getattr(registered, "__module__", "").startswith("torchao")
        return not (from_torchao and _ENUM_NOTICE in record.getMessage())


class _DropOtherAdaptersKeys(logging.Filter):
    """Keeps the missing-keys line when a key it lists is `adapter`'s own (`...lora_A.<adapter>.weight`)."""

    def __init__(self, adapter: str):
        super().__init__()
        self.adapter = adapter

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith(_MISSING_KEYS):
            return True
        keys = text.removeprefix(_MISSING_KEYS).strip().rstrip(".").split(", ")
        return any(f".{self.adapter}." in key for key in keys)


@contextlib.contextmanager
def loading_adapter(adapter: str) -> Iterator[None]:
    """While diffusers loads `adapter`: its missing-keys check reports that adapter's keys only."""
    logger, only_its_own = logging.getLogger(_PEFT_UTILS_LOGGER), _DropOtherAdaptersKeys(adapter)
    logger.addFilter(only_its_own)
    try:
        yield
    finally:
        logger.removeFilter(only_its_own)


def install_message_filters() -> None:
    """Drop the library lines above by their exact text. Idempotent."""
    for name, prefix in (
        (_KERNELS_LOGGER, _KERNELS_TRUST),
        (_DIFFUSERS_LOGGER_TORCHAO, _TORCHAO_CLASSES),
        (_DIFFUSERS_LOGGER_TORCHAO, _TORCHAO_INT8_FP32),
        (_TOKENIZER_LOGGER, _TOO_LONG),
        (_MATPLOTLIB_FONTS_LOGGER, _NEW_FONT_MANAGER),
        (_CPP_EXTENSION_LOGGER, _NO_CUDA_RUNTIME),
    ):
        logger = logging.getLogger(name)
        if not any(getattr(f, "prefix", None) == prefix for f in logger.filters):
            logger.addFilter(_DropExactMessage(prefix))
    pytree = logging.getLogger(_PYTREE_LOGGER)
    if not any(isinstance(f, _DropTorchaoEnumNotice) for f in pytree.filters):
        pytree.addFilter(_DropTorchaoEnumNotice())
    warnings.filterwarnings("ignore", message=_PEFT_SECOND_ADAPTER, category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", message=_INDUCTOR_COMPLEX, category=UserWarning, module=r"torch\._inductor")
    # bitsandbytes' own report of the same missing CPU kernel (4-bit layers, model.quantize: nf4, run on CUDA only).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun in agreement, "1 line" and "2 lines" (`plural` where adding an "s" is wrong)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def weights_bytes(folder: str | Path) -> int | None:
    """Bytes of the weight files under a local model folder; None for a hub id or a missing folder."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return None
    return sum(p.stat().st_size for p in root.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())


@contextlib.contextmanager
def quiet_progress_bars(quiet: bool = True) -> Iterator[None]:
    """transformers' and diffusers' own progress bars off (for weights that load or save in milliseconds), restored
    after."""
    if not quiet:
        yield
        return
    from diffusers.utils import logging as diffusers_logging  # noqa: PLC0415 - import qwen_image_lora stays light
    from transformers.utils import logging as transformers_logging  # noqa: PLC0415 - import qwen_image_lora stays light

    was = transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            transformers_logging.enable_progress_bar()
        if was[1]:
            diffusers_logging.enable_progress_bar()


class SurvivingStream:
    """`stream` until its reader has gone, then nothing. A trainer watched through `| tee`, or started by an
    `accelerate launch` that was killed (accelerate pipes its child's stderr), got EPIPE on its next line when a
    Ctrl-C or SIGTERM reached the reader too: it died with status 1 instead of writing the checkpoint that the
    signal asks for. Everything else is the stream's own (isatty, fileno, encoding)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
