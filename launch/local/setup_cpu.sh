#!/usr/bin/env bash
# Create .venv (Python 3.11) with the CPU build of torch and megatron-llmjp (editable, with test
# tools). Idempotent: reinstalls only when setup.cfg changed. Never installs Transformer Engine
# or apex (they need CUDA; see containers/ for the GPU image).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.llmjp-installed"
want="$(sha256sum setup.cfg | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
