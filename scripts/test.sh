#!/usr/bin/env bash
# Install (idempotent, exactly requirements.lock), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=$(cd "${QWEN_LORA_VENV:-.venv}" && pwd)
# The venv first on PATH, as after `. .venv/bin/activate` (tests launch `accelerate`, `qwen-lora`).
export PATH="$VENV/bin:$PATH" QWEN_LORA_VENV="$VENV"
export WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Test files spread over the cores (at most 4 workers: each holds its own tiny model and torch); `-n 0` runs serially.
exec "$VENV/bin/python" -m pytest -n auto --maxprocesses 4 --dist loadfile "$@"
