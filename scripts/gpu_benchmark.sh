#!/usr/bin/env bash
# The prepared GPU run of BAGEL-7B (`examples/benchmark.py --targets`): one table of random 7B weights built on the
# GPU in bf16, text-to-image 1024x1024 at 50 steps with the original's defaults (plain, TaylorSeer, compiled), an
# edit of a 1024x1024 image with dual CFG, the peak GPU memory of each, understanding (first-token latency, decode
# tokens/s) and int8 weights (peak memory, final-latent error against bf16), each against its target on one H200.
# About 3-5 minutes on an H200 (three builds of the random 7B; the compiled run pays its compilation).
#
# It is written for a GPU machine without network that has python3 with torch, transformers, accelerate and peft:
# what this project needs beyond that travels as wheels in .whl/ (fetched here, where a package index is reachable).
#
#   bash scripts/gpu_benchmark.sh --fetch_wheels   # with a package index: the wheels for the GPU machine into .whl/
#   bash scripts/gpu_benchmark.sh                  # on the GPU machine: installs .whl/ into a scratch folder, runs
#   bash scripts/gpu_benchmark.sh --rehearse       # on any CPU: the same run on the small configuration, 4 steps
#
# Further arguments go to examples/benchmark.py (e.g. `--steps 20`). The table, the JSON figures and the log are also
# written to $OUT (or ./gpu_benchmark_out).
set -euo pipefail
cd "$(dirname "$0")/.."

# transformers 5.24 (this project's pin), diffusers 0.42, torchao for the 8-bit weights (0.17 pairs with torch 2.11),
# and the few packages they need that such a machine may lack or hold in an older version.
WHEELS=(transformers==5.24.0 diffusers==0.42.1 torchao==0.17.0 importlib_metadata==10.2.0 zipp==4.1.2
        regex==2026.11.19)
PYTHON_VERSION="${BAGEL_GPU_PYTHON_VERSION:-3.12}"  # the GPU machine's python3
SITE="${BAGEL_GPU_SITE:-/tmp/bagel-gpu-site}"
OUT_DIR="${OUT:-gpu_benchmark_out}"

if [ "${1:-}" = "--fetch_wheels" ]; then
  mkdir -p .whl
  grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
  platforms=()
  for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64 any; do
    platforms+=(--platform "$tag")
  done
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
  ls -l .whl
  exit 0
fi

mkdir -p "$OUT_DIR"
if [ "${1:-}" = "--rehearse" ]; then
  shift
  PY="$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )"
  set -- --config small --device cpu --steps 4 --warmup_steps 2 --decode_tokens 8 "$@"
else
  PY=python3
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_benchmark: no wheels in .whl/ (run 'bash scripts/gpu_benchmark.sh --fetch_wheels' where a package" \
         "index is reachable); using the installed packages" >&2
  fi
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  set -- --config 7b --device cuda "$@"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'EOF'
import importlib, platform
import torch
versions = {name: getattr(importlib.import_module(name), "__version__", "?")
            for name in ("torch", "transformers", "diffusers", "accelerate", "torchao")}
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {device}")
EOF
set -o pipefail
"$PY" examples/benchmark.py --targets --json "$OUT_DIR/gpu_figures.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_benchmark.log"
