#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): a virtual environment in .venv with the CPU
# build of torch 2.13.0 pinned first (so nothing pulls a multi-GB CUDA build), then hcrlhf in
# editable mode with its test extras. The C++ extension is compiled during that install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet torch==2.13.0
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import hcrlhf, hcrlhf.ops; print('hcrlhf', hcrlhf.__version__, '| C++ extension built:', hcrlhf.ops.cpp_available())"
