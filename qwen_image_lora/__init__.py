"""Train, evaluate and serve LoRA adapters for Qwen-Image 2.x."""

__version__ = "0.1.0"
