"""`qwen-lora data caption`: write missing .txt captions with the Qwen3-VL model inside the checkpoint.

The checkpoint's `text_encoder` is a full `Qwen3VLForConditionalGeneration`, so it can describe images through
`.generate` with the processor's chat template; no second model is downloaded. Only folder data sets get
captions (a same-name .txt beside each image); an existing non-blank caption is kept unless `overwrite`.
With the tiny random test model the captions are gibberish, by design.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import Config
from qwen_image_lora.data.sources import DataError, load_items, open_image, source_format
from qwen_image_lora.io import atomic_write_text

CAPTION_PROMPT = (
    "Write one caption for this product photo, for training a text-to-image model. Describe the product, its "
    "brand name and logo, the text printed on it, its colours and materials, the background and the lighting. "
    "One sentence, no preamble."
)


@dataclass
class CaptionStats:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # already captioned, left alone
    failed: dict[str, str] = field(default_factory=dict)


def load_captioner(cfg: Config, device=None):
    """(model, processor): the checkpoint's own Qwen3-VL, which can describe images."""
    return qmodel.load_captioner(cfg.model.pretrained, cfg.model.dtype, cfg.model.revision, device)


@torch.no_grad()
def describe(model, processor, image, prompt: str = CAPTION_PROMPT, max_new_tokens: int = 96) -> str:
    """One greedy caption for a PIL image."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    caption = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return " ".join(caption.split())


def caption_folder(
    cfg: Config,
    *,
    overwrite: bool = False,
    prompt: str = CAPTION_PROMPT,
    max_new_tokens: int = 96,
    model=None,
    processor=None,
    log=print,
) -> CaptionStats:
    d = cfg.data
    # A `datasets` folder is a folder too: its captions went to .txt files beside its cached images, read by nothing.
    if d.path is None or not Path(d.path).is_dir() or source_format(d) != "folder":
        raise DataError("data.path: captioning writes .txt files beside the images, so it needs an image folder")
    items = [it for it in load_items(d) if not it.sources]
    stats = CaptionStats()
    todo = []
    for item in items:
        txt = item.target.with_suffix(".txt")
        if not overwrite and txt.is_file() and txt.read_text(encoding="utf-8", errors="replace").strip():
            stats.kept.append(txt)
        else:
            todo.append((item, txt))
    if todo and model is None:
        model, processor = load_captioner(cfg, "cuda" if torch.cuda.is_available() else None)
    for item, txt in todo:
        try:
            caption = describe(
                model, processor, open_image(item.target, "composite", d.background), prompt, max_new_tokens
            )
        except Exception as e:  # noqa: BLE001 - an unreadable image is the doctor's business; go on
            stats.failed[item.id] = f"{type(e).__name__}: {e}"
            continue
        atomic_write_text(txt, (caption or "(empty)") + "\n")
        stats.written.append(txt)
    log(
        f"captions: {len(stats.written)} written, {len(stats.kept)} kept (use --overwrite to replace), {len(stats.failed)} failed"
    )
    for item_id, reason in stats.failed.items():
        log(f"  failed {item_id}: {reason}")
    return stats
