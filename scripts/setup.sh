#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch first (from TORCH_SPEC), then this package editable with its extras.
# Re-running with nothing changed takes a second. Other platforms / CUDA versions:
#   TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" bash scripts/setup.sh
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-"test,serve,eval,optim"}
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.qwen-lora-setup
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: left to itself pip would resolve a multi-GB CUDA build from the index.
# shellcheck disable=SC2086
pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_SPEC
pip install -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
