#!/usr/bin/env bash
# The main job end to end on the embedded tiny model and the bundled synthetic data, on CPU:
# build model + data -> data doctor + prepare -> train a LoRA -> generate and edit with it -> evaluation report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=outputs/demo

qwen-lora make-tiny-model .cache/tiny-qwen-image-2.1 >/dev/null
qwen-lora make-sample-data .cache/sample-data >/dev/null
qwen-lora validate configs/demo.yaml
qwen-lora data doctor configs/demo.yaml
qwen-lora data prepare --config configs/demo.yaml
# Train a LoRA (100 steps, ~20 s on 2 CPU cores): adapter, samples, checkpoints and model card in $out.
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train/lora.py --config configs/demo.yaml --overwrite  # a rerun moves the previous demo run aside (never deletes it)
python -c "import json; m = json.load(open('$out/training_metadata.json')); \
print(f\"demo: loss {m['first_loss']:.3f} (first 10 steps) -> {m['final_loss']:.3f} (last 10), adapter in $out\")"
# Generate and edit with the trained adapter (the same sampling path as the training previews).
qwen-lora generate --config configs/demo.yaml --lora "$out" --steps 4 --seed 0 \
  --prompt "a qwnbrand bottle with the QWN logo on a white background, product photo" --output "$out/demo/generate.png"
qwen-lora edit --config configs/demo.yaml --lora "$out" --steps 4 --seed 0 \
  --image .cache/sample-data/edits/002_source.png \
  --prompt "replace the background with white, keep the qwnbrand product the same" --output "$out/demo/edit.png"
# Is the adapter better than the base model? Same prompts and seeds, scored; checkpoints ranked by held-out loss.
qwen-lora eval --config configs/demo.yaml --adapter "$out" --checkpoints "$out"
echo
echo "demo: adapter   $out/pytorch_lora_weights.safetensors (model card: $out/README.md)"
echo "demo: images    $out/demo/generate.png, $out/demo/edit.png, training previews in $out/samples"
echo "demo: report    $out/eval/report.html"
