"""What `Generator.generate` hands the pipeline shows in the image: the negative prompt and the guidance scale each
change it (a negative prompt dropped on its way, or a scale fixed at the default, passed every other test)."""

import numpy as np

from qwen_image_lora.inference.generator import GenerationRequest, Generator


def test_the_negative_prompt_and_the_guidance_scale_reach_the_pipeline(tiny_pipe):
    gen = Generator(tiny_pipe, resolution=64)

    def render(**settings) -> np.ndarray:
        request = GenerationRequest("a qwnbrand bottle", num_inference_steps=2, seed=3, width=64, height=64, **settings)
        return np.asarray(gen.generate(request), dtype=float)

    plain = render()
    guided = render(negative_prompt="blurry, low quality", guidance_scale=8.0)
    # The tiny random model moves pixels by about 0.2 to 0.8 levels on average here; a setting lost on the way, 0.
    assert np.abs(guided - plain).mean() > 0.1  # guided away from the negative prompt
    assert np.abs(render(negative_prompt="a red car", guidance_scale=8.0) - guided).mean() > 0.1  # from this one
    assert np.abs(render(negative_prompt="blurry, low quality", guidance_scale=2.0) - guided).mean() > 0.1  # this far
    # A scale of 1 is no guidance: the negative prompt then changes nothing.
    assert np.array_equal(render(negative_prompt="blurry, low quality", guidance_scale=1.0), plain)
