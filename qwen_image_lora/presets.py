"""The model's named presets and its pixel grid: plain data, light to import. The config schema and the CLI's flags
check against them before torch loads, and the model module sizes and targets with the same values."""

SIDE_MULTIPLE = 32  # one vision slot = 2x2 latents = 32x32 pixels: every image side is a multiple of it
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
