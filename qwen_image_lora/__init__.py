"""Train, evaluate and serve LoRA adapters for Qwen-Image 2.x."""

from qwen_image_lora.console import install_message_filters

__version__ = "0.1.0"

install_message_filters()
