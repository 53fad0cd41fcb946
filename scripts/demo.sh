#!/usr/bin/env bash
# The main job end to end on the embedded tiny model and the bundled synthetic data, on CPU:
# build model + data -> data doctor + prepare -> train a LoRA -> generate and edit with it -> evaluation report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# On CPU, accelerate launch picks a thread count and says so in three lines unless one is set.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
out=outputs/demo
# One demo folder: a rerun replaces the previous demo run and the copies older demos moved aside (outputs/demo.*).
if compgen -G "$out*" >/dev/null; then
  echo "demo: replacing the previous demo run in $out"
  rm -rf "$out" "$out".*
fi

qwen-lora make-tiny-model .cache/tiny-qwen-image-2.1 >/dev/null
qwen-lora make-sample-data .cache/sample-data >/dev/null
qwen-lora validate configs/demo.yaml
qwen-lora data doctor configs/demo.yaml
qwen-lora data prepare --config configs/demo.yaml
# Train a LoRA (100 steps): adapter, samples, checkpoints and model card in $out.
start=$SECONDS
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train/lora.py --config configs/demo.yaml
python -c "import json; m = json.load(open('$out/training_metadata.json')); \
print(f\"demo: trained 100 steps in $((SECONDS - start)) s; loss {m['first_loss']:.3f} (first 10 steps) -> {m['final_loss']:.3f} (last 10), adapter in $out\")"
# Generate and edit with the trained adapter (the same sampling path as the training previews).
qwen-lora generate --config configs/demo.yaml --lora "$out" --steps 4 --seed 0 \
  --prompt "a qwnbrand bottle with the QWN logo on a white background, product photo" --output "$out/generate.png"
qwen-lora edit --config configs/demo.yaml --lora "$out" --steps 4 --seed 0 \
  --image .cache/sample-data/edits/002_source.png \
  --prompt "replace the background with white, keep the qwnbrand product the same" --output "$out/edit.png"
# Is the adapter better than the base model? Same prompts and seeds, scored; checkpoints ranked by held-out loss.
qwen-lora eval --config configs/demo.yaml --adapter "$out" --checkpoints "$out"
echo
echo "demo: adapter   $out/pytorch_lora_weights.safetensors (model card: $out/README.md)"
echo "demo: images    $out/generate.png, $out/edit.png, training previews in $out/samples"
echo "demo: report    $out/eval/report.html"
