#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch first (from TORCH_SPEC), then this package editable with its extras.
# Re-running with nothing changed takes a second. Other platforms / CUDA versions:
#   TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" bash scripts/setup.sh
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # no GPU: ~200 MB instead of GBs
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-"test,serve,eval,optim"}
PYTHON=${PYTHON:-python3}

say() { echo "setup: $*" >&2; }
stamp=.venv/.qwen-lora-setup
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# Before torch is in: refuse on a disk too full for it, instead of pip's "[Errno 28]" minutes into the download.
need_gb=${SETUP_NEED_GB:-$([ -n "${TORCH_INDEX_URL:-}" ] && echo 2 || echo 8)}
free_gb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
if ! compgen -G ".venv/lib/python*/site-packages/torch/__init__.py" > /dev/null && [ "$free_gb" -lt "$need_gb" ]; then
  say "only ${free_gb} GB free on $(df -P . | awk 'NR==2 {print $6}'); installing $TORCH_SPEC needs about ${need_gb} GB."
  say "free some space (old clones, ~/.cache/pip, /tmp), or, with no GPU, install the CPU build (~2 GB):"
  say "  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh"
  exit 1
fi
[ -x .venv/bin/python ] || { say "creating .venv with $PYTHON"; "$PYTHON" -m venv .venv; }
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
# torch first and pinned: left to itself pip would resolve a multi-GB CUDA build from the index. Not quiet: on a
# fresh machine this is the long part, and pip's download lines show that it is moving.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  say "1/2 installing $TORCH_SPEC from $TORCH_INDEX_URL (a CPU build is ~200 MB: about a minute)"
else
  say "1/2 installing $TORCH_SPEC with CUDA libraries: a download of 3 GB or more, 2-10 minutes on a fresh machine"
  say "    (no GPU? TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh is ~200 MB)"
fi
# shellcheck disable=SC2086
pip install --progress-bar on ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_SPEC
say "2/2 installing qwen-image-lora and its extras [$EXTRAS] (diffusers, transformers, ...): about 1-3 minutes"
pip install -q -e ".[$EXTRAS]"
echo "$want" > "$stamp"
say ".venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
