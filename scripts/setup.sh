#!/usr/bin/env bash
# Idempotent set-up: a .venv holding exactly requirements.lock (what the suite passed with), then this package
# editable. Re-running with nothing changed takes a second. Torch comes from the lock (a CUDA build), except on a
# machine with no NVIDIA GPU, where the CPU build of the same version is swapped in when its index answers
# within a few seconds (~200 MB instead of ~7 GB). Overrides:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh   # another build of the locked torch
#   TORCH_INDEX_URL= bash scripts/setup.sh                                         # the lock's own build, no probe
# Refreshing the lock itself: bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${QWEN_LORA_VENV:-.venv}
LOCK=${QWEN_LORA_LOCK:-requirements.lock}
CPU_INDEX=${QWEN_LORA_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# Packages only the CUDA build of torch needs; the CPU build installs without them.
CUDA_ONLY='^(nvidia-|cuda-|triton==)'

say() { echo "setup: $*" >&2; }
[ -f "$LOCK" ] || { say "$LOCK is missing; restore it (git checkout $LOCK) or make one with scripts/lock.sh"; exit 1; }
locked() { grep -E "^$1==" "$LOCK" | cut -d= -f3; }

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
index_answers() {  # within 5 s: an unreachable index must not cost a user minutes of pip retries
  "$PYTHON" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).read(1)
EOF
}

stamp=$VENV/.qwen-lora-setup
if [ -n "${TORCH_INDEX_URL+set}" ]; then
  torch_index=$TORCH_INDEX_URL
elif [ -f "$stamp" ]; then
  torch_index=$(sed -n 's/.* torch-index=//p' "$stamp")  # keep the build this venv was made with
elif has_nvidia_gpu; then
  torch_index=
else
  torch_index=$CPU_INDEX
  if ! index_answers "$CPU_INDEX"; then
    say "no NVIDIA GPU here, but the CPU build's index ($CPU_INDEX) did not answer within 5 s:"
    say "installing the lock's default torch build instead (CUDA libraries, ~7 GB; it runs on the CPU too)"
    torch_index=
  fi
fi

want="$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16) torch-index=$torch_index"
# `accelerate launch train/lora.py ...` (the README's command) prints six lines of defaults it assumed unless a
# default accelerate config exists: write accelerate's own (`accelerate config default`) when there is none.
accelerate_config=${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/accelerate/default_config.yaml
write_accelerate_config() {
  [ -f "$accelerate_config" ] || [ ! -x "$VENV/bin/accelerate" ] && return
  "$VENV/bin/accelerate" config default >/dev/null
  say "wrote accelerate's default config ($accelerate_config) so accelerate launch needs no flags; change it with: accelerate config"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  write_accelerate_config
  exit 0
fi
# Before torch is in: refuse on a disk too full for it, instead of pip's "[Errno 28]" minutes into the download.
need_gb=${SETUP_NEED_GB:-$([ -n "$torch_index" ] && echo 2 || echo 8)}
free_gb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
if ! compgen -G "$VENV/lib/python*/site-packages/torch/__init__.py" > /dev/null && [ "$free_gb" -lt "$need_gb" ]; then
  say "only ${free_gb} GB free on $(df -P . | awk 'NR==2 {print $6}'); installing torch needs about ${need_gb} GB."
  say "free some space (old clones, ~/.cache/pip, /tmp), or, with no GPU, install the CPU build (~2 GB):"
  say "  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh"
  exit 1
fi
[ -x "$VENV/bin/python" ] || { say "creating $VENV with $PYTHON"; "$PYTHON" -m venv "$VENV"; }
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
torch_spec="torch==$(locked torch) torchvision==$(locked torchvision)"
# Not quiet: on a fresh machine torch is the long part, and pip's download lines show that it is moving.
if [ -n "$torch_index" ]; then
  say "1/2 installing $torch_spec from $torch_index (~200 MB for the CPU build: about a minute)"
  # A CPU build needs nothing beyond the lock; another build (cu128, ...) brings its own CUDA packages.
  case $torch_index in */cpu) deps=--no-deps ;; *) deps= ;; esac
  # shellcheck disable=SC2086
  pip install --progress-bar on $deps --index-url "$torch_index" $torch_spec
  rest=$(mktemp)
  trap 'rm -f "$rest"' EXIT
  grep -vE "$CUDA_ONLY|^(torch|torchvision)==" "$LOCK" > "$rest"
else
  say "1/2 installing $torch_spec with CUDA libraries: a download of 3 GB or more, 2-10 minutes on a fresh machine"
  rest=$LOCK
fi
say "2/2 installing the other locked packages (diffusers, transformers, ...) and qwen-image-lora: 1-3 minutes"
# --no-deps: the lock is the whole set, so nothing outside it can slip in through a dependency's open range.
pip install -q --no-deps -r "$rest"
pip install -q --no-deps --no-build-isolation -e .  # setuptools is in the lock: no build download
write_accelerate_config
echo "$want" > "$stamp"
say "$VENV ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
