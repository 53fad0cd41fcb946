"""Train, evaluate and serve LoRA adapters for Qwen-Image 2.x."""

import logging

__version__ = "0.1.0"

# bitsandbytes (for optim.name: adamw8bit) warns on import, on CPUs with AVX512-BF16, that a 4-bit CPU kernel
# from the hub is unavailable; we never use 4-bit layers, and fetching kernels from a hub is not wanted anyway.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
