"""Training from a complete cache keeps only the transformer on the GPU: the encoders are offloaded, and the
model functions still encode through them (they follow the pipeline's execution device, not the weights')."""

import torch
from PIL import Image

from qwen_image_lora import model as qmodel
from qwen_image_lora.config import load_config
from qwen_image_lora.data.dataset import build_training_data


def test_offloaded_encoders_give_the_same_latents_and_embeddings(tiny_model_dir):
    plain = qmodel.load_pipeline(tiny_model_dir, "float32")
    offloaded = qmodel.load_pipeline(tiny_model_dir, "float32")
    qmodel.offload_encoders(offloaded, torch.device("cpu"))
    assert any(hasattr(m, "_diffusers_hook") for m in offloaded.text_encoder.modules())
    image = Image.new("RGB", (64, 96), "teal")
    pixels = qmodel.image_to_pixels(plain, image)
    torch.testing.assert_close(qmodel.encode_latents(offloaded, pixels), qmodel.encode_latents(plain, pixels))
    a = qmodel.encode_prompt(plain, ["a qwnbrand mug"], [image])
    b = qmodel.encode_prompt(offloaded, ["a qwnbrand mug"], [image])
    torch.testing.assert_close(b.embeds, a.embeds)
    assert torch.equal(b.image_pad, a.image_pad)


def test_uncached_entries_counts_down_to_zero(tiny_pipe, tiny_model_dir, sample_data_dir):
    cfg = load_config(
        "configs/demo.yaml",
        [
            f"data.path={sample_data_dir / 'manifest.jsonl'}",
            f"model.pretrained={tiny_model_dir}",
            "data.cache_dir=null",
            "data.caption_dropout=0.1",
        ],
    )
    data = build_training_data(cfg, tiny_pipe)
    ds = data.dataset
    total = sum(len(ds.texts_for(i)) for i in range(len(ds)))
    assert data.uncached_entries() == total > len(ds)  # every caption plus the dropout "" per item
    ds.sample(0, ds.texts_for(0)[0])
    assert data.uncached_entries() == total - 1
    for i in range(len(ds)):
        for text in ds.texts_for(i):
            ds.sample(i, text)
    assert data.uncached_entries() == 0
