"""Latent packing and the transformer-call layout of the model module, against the pipeline's own packing: a
transposed or mis-sliced token sequence trains on the wrong pixels without any error."""

import pytest
import torch
from diffusers import QwenImage21Pipeline

from qwen_image_lora import model as qmodel


def test_pack_and_unpack_are_the_pipelines():
    latents = torch.randn(2, 8, 1, 4, 6, generator=torch.Generator().manual_seed(0))  # h != w
    packed = qmodel.pack(latents)
    assert packed.shape == (2, 24, 8)
    torch.testing.assert_close(packed, QwenImage21Pipeline._pack_latents(latents, 2, 8, 4, 6), rtol=0, atol=0)
    # The pipeline unpacks from pixel sizes; one latent is 16 px here.
    theirs = QwenImage21Pipeline._unpack_latents(packed, 4 * 16, 6 * 16, 16)
    torch.testing.assert_close(qmodel.unpack(packed, 4, 6), theirs, rtol=0, atol=0)
    assert torch.equal(qmodel.unpack(packed, 4, 6), latents)
    # Token k is latent (row k // w, column k % w).
    assert torch.equal(packed[1, 7], latents[1, :, 0, 1, 1])


def test_pad_prompt_embeds_pads_right_and_masks_the_padding():
    short = qmodel.PromptEmbeds(torch.ones(1, 2, 4), None, torch.tensor([[True, False]]))
    long = qmodel.PromptEmbeds(
        torch.full((1, 3, 4), 2.0), torch.tensor([[1, 1, 0]]), torch.zeros(1, 3, dtype=torch.bool)
    )
    batch = qmodel.pad_prompt_embeds([short, long])
    assert batch.embeds.shape == (2, 3, 4)
    assert torch.equal(batch.embeds[0, :2], torch.ones(2, 4)) and torch.equal(batch.embeds[0, 2], torch.zeros(4))
    assert torch.equal(batch.embeds[1], torch.full((3, 4), 2.0))
    assert batch.mask.tolist() == [[True, True, False], [True, True, False]]
    assert batch.image_pad.tolist() == [[True, False, False], [False, False, False]]
    # Nothing padded and nothing masked: no mask at all, as the pipeline passes it.
    same = qmodel.pad_prompt_embeds([short, short])
    assert same.mask is None and same.embeds.shape == (2, 2, 4)


def test_split_prompt_embeds_cuts_each_sample_back_to_its_own_tokens():
    # More tokens than hidden width, so cutting a sample at the width instead of its length shows.
    short = qmodel.PromptEmbeds(torch.arange(6.0).view(1, 3, 2), None, torch.tensor([[True, False, False]]))
    long = qmodel.PromptEmbeds(torch.arange(8.0).view(1, 4, 2) + 100, None, torch.tensor([[False, False, True, False]]))
    for originals in ([short, long], [long, short], [short, short]):
        parts = qmodel.split_prompt_embeds(qmodel.pad_prompt_embeds(originals))
        assert len(parts) == len(originals)
        for part, original in zip(parts, originals):
            assert part.mask is None  # as the pipeline gives one prompt alone: nothing padded
            assert torch.equal(part.embeds, original.embeds) and torch.equal(part.image_pad, original.image_pad)


class _Echo:
    """A transformer stand-in that returns 2x its input tokens and records the call."""

    dtype = torch.float32

    def __init__(self):
        self.kwargs = None

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return (2 * kwargs["hidden_states"],)


@pytest.mark.parametrize("n_cond", [0, 2])
def test_predict_velocity_lays_out_the_sequence_and_returns_the_target_tokens(n_cond):
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 8, 1, 4, 6, generator=g)
    conds = [torch.randn(2, 8, 1, 2, 2 * (i + 1), generator=g) for i in range(n_cond)]
    image_pad = torch.tensor([[False, True, True], [False, True, False]])
    prompt = qmodel.PromptEmbeds(torch.randn(2, 3, 5, generator=g), torch.tensor([[1, 1, 1], [1, 1, 0]]), image_pad)
    echo = _Echo()
    out = qmodel.predict_velocity(echo, noisy, prompt, torch.tensor([0.25, 0.75]), conds)
    torch.testing.assert_close(out, 2 * noisy)  # only the target's tokens come back, in place
    kw = echo.kwargs
    torch.testing.assert_close(
        kw["hidden_states"], torch.cat([*(qmodel.pack(c) for c in conds), qmodel.pack(noisy)], 1)
    )
    assert kw["img_shapes"] == [[(1, 2, 2 * (i + 1)) for i in range(n_cond)] + [(1, 4, 6)]] * 2
    # The mask: the prompt's image-pad slots, then one slot per 2x2 group of target latents (4 * 6 / 4 = 6).
    assert kw["img_mask"].tolist() == [row + [True] * 6 for row in image_pad.tolist()]
    torch.testing.assert_close(kw["timestep"], torch.tensor([0.25, 0.75]))
    assert torch.equal(kw["encoder_hidden_states"], prompt.embeds)
    assert torch.equal(kw["encoder_hidden_states_mask"], prompt.mask)
    assert kw["return_dict"] is False


def test_padding_an_unmasked_prompt_beside_a_longer_one_gives_a_boolean_mask():
    short = qmodel.PromptEmbeds(torch.ones(1, 3, 4), None, torch.zeros(1, 3, dtype=torch.bool))
    long = qmodel.PromptEmbeds(
        torch.ones(1, 5, 4), torch.ones(1, 5, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.bool)
    )
    padded = qmodel.pad_prompt_embeds([short, long])
    assert padded.mask.dtype == torch.bool  # the transformer takes it as a key mask
    assert padded.mask.tolist() == [[True, True, True, False, False], [True] * 5]


def test_predict_velocity_casts_its_inputs_to_the_transformers_dtype_and_passes_attention_kwargs():
    """fp32 LoRA maths meets a bf16 (here: fp32 beside fp64 inputs) base model: the call gets the model's dtype."""
    g = torch.Generator().manual_seed(2)
    noisy = torch.randn(1, 8, 1, 2, 2, generator=g, dtype=torch.float64)
    prompt = qmodel.PromptEmbeds(
        torch.randn(1, 3, 5, generator=g, dtype=torch.float64), None, torch.zeros(1, 3, dtype=torch.bool)
    )
    echo = _Echo()
    qmodel.predict_velocity(
        echo, noisy, prompt, torch.tensor([0.5], dtype=torch.float64), attention_kwargs={"scale": 0.5}
    )
    kw = echo.kwargs
    assert {kw[k].dtype for k in ("hidden_states", "timestep", "encoder_hidden_states")} == {torch.float32}
    assert kw["attention_kwargs"] == {"scale": 0.5}
