#!/usr/bin/env bash
# Sets up .venv with everything this project needs, on a fresh machine. Safe to run again.
# torch is installed first and pinned to 2.13.0: on the project's CPU machines that is a local CPU build, while an
# unpinned `torch` requirement would pull a multi-GB CUDA build. Set BAGEL_TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "${BAGEL_TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)'))"
