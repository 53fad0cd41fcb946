#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml's ranges (all extras) in a fresh venv, freeze it, build a
# second fresh venv from that candidate exactly as setup.sh does for users, and run the whole suite there. Only a
# green suite replaces requirements.lock; otherwise the candidate stays in build/ for a look. Takes the suite's
# time plus two installs (~15 min on 2 cores). Other arguments go to pytest.
#   bash scripts/lock.sh             # keeps every locked version the ranges still admit: only new packages resolve
#   bash scripts/lock.sh --upgrade   # every package at the newest version its range admits
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
keep=(-c requirements.lock)
if [ "${1:-}" = "--upgrade" ]; then
  keep=()
  shift
fi
work=build/lock
rm -rf "$work" && mkdir -p "$work"
say() { echo "lock: $*" >&2; }

say "resolving pyproject.toml's ranges in $work/resolve"
"$PYTHON" -m venv "$work/resolve"
"$work/resolve/bin/python" -m pip install -q --disable-pip-version-check "${keep[@]}" \
  -e ".[test,serve,eval,optim,quant,mutation]"
{
  sed -n '/^#/p' requirements.lock
  "$work/resolve/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -v '^pip=='
} > "$work/requirements.lock"
# (not a pipeline's status: diff's 1 for "they differ" made it say "no version changed" whenever one had)
changes=$(diff -u requirements.lock "$work/requirements.lock" | grep -E '^[-+][^-+#]' || true)
if [ -n "$changes" ]; then echo "$changes" >&2; else say "no version changed"; fi

say "running the suite in a fresh venv built from the candidate lock ($work/venv)"
if QWEN_LORA_VENV="$work/venv" QWEN_LORA_LOCK="$work/requirements.lock" bash scripts/test.sh "$@"; then
  cp "$work/requirements.lock" requirements.lock
  say "suite passed: requirements.lock updated; commit it (and raise any upper bound in pyproject.toml it reached)"
else
  say "suite failed against the candidate: requirements.lock unchanged; candidate kept in $work/requirements.lock"
  exit 1
fi
