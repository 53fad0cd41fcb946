#!/usr/bin/env bash
# Install (idempotent), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The venv first on PATH, as after `. .venv/bin/activate` (tests launch `accelerate`, `qwen-lora`).
export PATH="$PWD/.venv/bin:$PATH"
export WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
