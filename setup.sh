#!/usr/bin/env bash
# Creates .venv at the repository root and installs hybridize (editable) with its GGUF, data, plot and test extras.
# torch: an existing install in .venv is kept; otherwise TORCH_SPEC is installed (default torch==2.13.0, whose CPU
# build this project's CI machines hold locally; on a GPU machine set TORCH_SPEC to the CUDA build you want).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev,gguf,data,plot]"
echo "hybridize installed in $(pwd)/.venv"
