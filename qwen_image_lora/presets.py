"""The model's named presets and its pixel grid: plain data, light to import. The config schema and the CLI's flags
check against them before torch loads, and the model module sizes and targets with the same values."""

SIDE_MULTIPLE = 32  # one vision slot = 2x2 latents = 32x32 pixels: every image side is a multiple of it
# The largest side an image is rendered at: 4x the model's 1024 px working size (16 MP at 4096 x 4096). Far past it
# the scheduler's resolution shift overflows (NaN sigmas from ~12000 px, a math range error beyond).
MAX_SIDE = 4096
# A mask may be another size than its image, not another shape: beyond 2% apart in aspect, scaling it would distort it.
MAX_ASPECT_CHANGE = 0.02


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether sizes `a` and `b` (width, height) have one aspect, within MAX_ASPECT_CHANGE: the one rule for a mask
    against its image (the data doctor, masked edits, batch lines)."""
    return abs((a[0] / a[1]) / (b[0] / b[1]) - 1) <= MAX_ASPECT_CHANGE


# Aspect-ratio presets, turned into a size by the one sizing rule (`model.fit_size`).
ASPECT_RATIOS = {
    "1:1": (1, 1),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "3:2": (3, 2),
    "2:3": (2, 3),
}
# LoRA target presets: module-name suffixes inside the transformer's blocks.
LORA_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+mlp": ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"],
    "all-linear": "all-linear",
}
