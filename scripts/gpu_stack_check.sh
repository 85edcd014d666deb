#!/usr/bin/env bash
# The test suite on this CPU under the GPU machine's Python stack: torch 2.11 (its CUDA build, which runs on
# CPU too), transformers 5.17, huggingface_hub 1.33 and tokenizers 0.23, the versions its image held when last
# read (2026-11). CI tests torch 2.13 and the newest transformers; a call that the GPU machine's versions lack
# would otherwise first show in the GPU suite, whose device time is scarce.
#
#   make test-gpu-stack     (or: bash scripts/gpu_stack_check.sh [pytest args]; needs `make install` first)
#
# Downloads ~5 GB into $GPU_STACK_VENV (default /tmp/gemforge-gpu-stack) once. The Triton kernels run under
# Triton 3.9's interpreter, as in CI: torch 2.11's own Triton, 3.6, compiles them (tests/kernels/triton_compile.py)
# but its interpreter cannot take a loaded scalar as a range() bound ("only 0-dimensional arrays can be converted
# to Python scalars"), which every kernel with a data-dependent loop does.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${GPU_STACK_VENV:-/tmp/gemforge-gpu-stack}
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
ls "$ROOT"/kernels/_C.*.so >/dev/null 2>&1 || { echo "gpu_stack_check: no kernels/_C built; run 'make install' first" >&2; exit 2; }
if [ ! -f "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "${PIP[@]}" --index-url https://pypi.org/simple torch==2.11.0
  "${PIP[@]}" transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2 safetensors sentencepiece tqdm \
    fastapi uvicorn prometheus-client httpx openai pytest pytest-benchmark matplotlib pybind11
  "${PIP[@]}" --no-deps --target "$VENV/triton-3.9" triton==3.9.0
  touch "$VENV/.installed"
fi
# gemforge from this checkout without installing it (as benchmarks/gpu_suite.sh does): gemforge/{kernels,engine}.
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/gemforge"
ln -s "$ROOT/kernels" "$SHIM/gemforge/kernels"
ln -s "$ROOT/engine" "$SHIM/gemforge/engine"
"$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
cd "$ROOT"
PYTHONPATH="$VENV/triton-3.9:$SHIM" PYTHONSAFEPATH=1 "$VENV/bin/python" -m pytest -q --benchmark-disable \
  -p no:cacheprovider "$@"
