"""`qwen-lora export`: write a trained adapter in another tool's layout. (Training itself is
`accelerate launch train/lora.py --config ...`, so accelerate owns the processes.)"""

from __future__ import annotations

import sys
from pathlib import Path

from qwen_image_lora import run_layout as layout


def _export(args) -> int:
    from qwen_image_lora.adapter_format import export_adapter
    from qwen_image_lora.config import DEFAULT_MODEL
    from qwen_image_lora.errors import NotFound
    from qwen_image_lora.hub import check_pretrained

    if (
        args.model == DEFAULT_MODEL
    ):  # its architecture is built in: offline and uncached it reads as leaving --model out
        args.model = None
    if args.model:  # its config.json falls back to the released model's: a typo was "does not fit" the adapter
        config = Path(args.model).expanduser() / "transformer" / "config.json"
        if Path(args.model).expanduser().is_dir() and not config.is_file():
            raise NotFound(f"--model: {args.model} has no transformer/config.json, which export reads", "--model")
        if not Path(args.model).expanduser().is_dir():
            check_pretrained(args.model, field="--model")
    written = export_adapter(args.adapter_dir, args.format, args.output, args.model)
    print(written)
    step = next((p for p in Path(written).resolve().parents if p.parent.name == layout.CHECKPOINTS), None)
    if step is not None and layout.checkpoint_step(step) is not None:  # rotation took the export with the folder
        print(f"note: {written} lies in the checkpoint folder {step.name}, which checkpoint rotation deletes when the "
              "run continues (checkpoint.keep_last); copy it out, or give --output elsewhere", file=sys.stderr)  # fmt: skip
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a trained adapter in another layout (ComfyUI)")
    p.add_argument("adapter_dir", help="a training output folder (holds pytorch_lora_weights.safetensors) or the file")
    p.add_argument("--format", choices=["comfyui"], default="comfyui")
    p.add_argument(
        "--model",
        help="hub id or folder of the base model the adapter is checked (and a kohya-style file unflattened) "
        "against: its config.json only, no weights (default: the training run's base model, else "
        "Qwen/Qwen-Image-2.1's architecture)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="file or folder to write (default: <adapter_dir>/comfyui_lora.safetensors; a file source gives <stem>_comfyui.safetensors)",
    )
    p.set_defaults(func=_export)
