#!/usr/bin/env bash
# The one GPU run: build csrc/, test every kernel on the GPU, measure the ceilings, benchmark the
# kernels, end-to-end decode and continuous-batching throughput against HF transformers, and summarise. Each part has its own
# time limit, cut further so that the whole run ends within SUITE_BUDGET seconds (default 480) with
# the summary written; a part that fails or times out is reported and the rest still runs.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [PACKDIR]   (GPU machine: python3 with torch, triton, transformers)
# Parts run in order of what they settle (correctness, then the end-to-end headline, then the details),
# so that what the budget cuts is the least needed. PACKDIR (e.g. the device tool's $OUT, which returns
# at most 8 files) gets four files at the end: suite.tgz (all of OUTDIR), summary.md, status.txt, suite.log.
# Env: SUITE_QUICK=1 runs fewer shapes; GEMFORGE_CUDA_ARCHS (default 90a) picks the build target;
# SUITE_ONLY="build decode ..." runs just those parts (and the summary), e.g. to rerun what failed.
set -u
OUT=${1:?usage: gpu_suite.sh OUTDIR [PACKDIR]}
PACK=${2:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "$PACK" ]; then mkdir -p "$PACK" && PACK=$(cd "$PACK" && pwd); fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export ROOT PY  # (functions run by part see them)
LOG="$OUT/suite.log"
STATUS="$OUT/status.txt"
: > "$STATUS"
export PYTHONUNBUFFERED=1
# Everything runs from OUTDIR, every path below absolute: `python -m` and `-c` put the working directory
# first on sys.path, and from the repository root its kernels/ folder would shadow the `kernels` package
# that transformers imports.
cd "$OUT" || exit 1

# Import gemforge from this checkout without installing: gemforge/{kernels,engine} -> the folders.
SHIM=$(mktemp -d)
mkdir -p "$SHIM/gemforge"
ln -s "$ROOT/kernels" "$SHIM/gemforge/kernels"
ln -s "$ROOT/engine" "$SHIM/gemforge/engine"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"

BUDGET=${SUITE_BUDGET:-480}
SUMMARY_RESERVE=25

part() {  # part NAME SECONDS COMMAND...   (SECONDS is cut to what the budget leaves; COMMAND may be a function)
  local name=$1 limit=$2; shift 2
  if [ -n "${SUITE_ONLY:-}" ] && [ "$name" != summary ] && [[ " $SUITE_ONLY " != *" $name "* ]]; then
    echo "$name: not run (SUITE_ONLY)" | tee -a "$STATUS" "$LOG"; return
  fi
  if declare -F "$1" >/dev/null; then  # timeout runs programs, not shell functions: give it a bash that has it
    set -- bash -c "$(declare -f "$1"); $(printf '%q ' "$@")"
  fi
  local t0=$SECONDS left=$((BUDGET - SECONDS - SUMMARY_RESERVE))
  [ "$name" = summary ] && left=$((BUDGET - SECONDS))
  if [ "$left" -lt 10 ]; then echo "$name: SKIPPED (suite budget spent)" | tee -a "$STATUS" "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] start (limit ${limit}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local verdict=ok; [ $rc -ne 0 ] && verdict="FAILED rc=$rc"; [ $rc -eq 124 ] && verdict="TIMEOUT"
  echo "$name: $verdict ($((SECONDS - t0))s)" | tee -a "$STATUS" "$LOG"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
} >>"$LOG" 2>&1

build() {  # the CPU and CUDA kernels; fails unless the CUDA part is built
  local arch=${GEMFORGE_CUDA_ARCHS:-90a}
  local nvcc; nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  cmake -S "$ROOT" -B /tmp/gemforge-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGEMFORGE_OUTPUT_DIR="$ROOT/kernels" -DGEMFORGE_CUDA_ARCHS="$arch" -DGEMFORGE_REQUIRE_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$nvcc" -DGEMFORGE_CUDA_EMULATOR=OFF \
    -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
    && cmake --build /tmp/gemforge-build -j "$(nproc)" \
    && $PY -c 'import torch, gemforge.kernels._C as c; assert c.WITH_CUDA, "built without CUDA"; print("_C: CUDA and CPU kernels")'
}
part build 200 build

part ceilings 60 $PY "$ROOT/benchmarks/ceilings.py" "$OUT/ceilings.json"
BW=$($PY -c "import json; print(json.load(open('$OUT/ceilings.json'))['copy_GBps'])" 2>/dev/null || echo 3000)

# Correctness first, before the long benchmarks (earlier H100 runs: ~2.5 min of tests in one process,
# mostly Triton compiling; pytest-xdist, on the GPU image, spreads them over 8 processes). The
# compile-time checks of tests/kernels run in CI against CI's nvcc and Triton: here they would only add
# minutes, or fail on another nvcc's register choices. Up to 10 failures are reported before it stops.
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
TESTS_FROM=$(wc -l <"$LOG")  # (the log outlives a SUITE_ONLY rerun: its own lines only)
part tests 120 $PY -m pytest -v --tb=short --maxfail=10 $XDIST --timeout=120 -p no:cacheprovider \
  "$ROOT/tests/gpu" "$ROOT/tests/kernels" \
  --ignore="$ROOT/tests/kernels/test_triton_compile.py" --ignore="$ROOT/tests/kernels/test_cuda_resources.py" \
  --junitxml="$OUT/tests.xml" 2>/dev/null || true
tail -n +"$((TESTS_FROM + 1))" "$LOG" | grep -E "^=+ .*(passed|failed|error).* in [0-9.]+s" | tail -1 >>"$STATUS"

# Kernel benchmarks in two runs, each writing its own JSON, and each case a JSON line as it is measured
# (pytest-benchmark writes its JSON at the end: a run cut by its limit leaves only the lines).
# torch.compile peers compile for minutes: SUITE_COMPILE_PEERS=1 adds them. The CUDA kernels first: their
# GEMV cases (first in the file) decide the kernels still off by default (kernels/_native.py TENSOR_CORE_OPS).
export GEMFORGE_BENCH_COMPILE=${SUITE_COMPILE_PEERS:-0}
BENCH_ARGS="-q -p no:cacheprovider --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.05"
GEMFORGE_BENCH_LOG="$OUT/kernels-cuda.jsonl" part kernel_cuda 60 $PY -m pytest $BENCH_ARGS \
  "$ROOT/benchmarks/kernels/bench_cuda_ops.py" --benchmark-json="$OUT/kernels-cuda.json"

# The headline: bf16 decode of both models against HF's static cache, and the verify-window costs; then the
# quantized formats (no HF peer), each group in a process and a JSON of its own: int4 and int8; the same
# weights on kernels off by default until this times them end to end (int4-mma, int8-mma on the tensor
# cores; the dense linears on the CUDA GEMV at one row, none-gemv, or the tensor cores up to 16 rows,
# none-dmma, instead of cuBLAS: a kernel that faulted would take its process's CUDA context with it); the
# drafts' formats (the head quantized, or cut to 32768 rows) that the speculative implied speedups use.
BATCHES="1 8 64"; [ "${SUITE_QUICK:-0}" = 1 ] && BATCHES="1 8"
DECODE=("$PY" "$ROOT/benchmarks/engine/bench_decode.py" --models codegemma-2b codegemma-7b --steps 32)
part decode 150 "${DECODE[@]}" --batches $BATCHES --quant none --verify --bandwidth-GBps "$BW" --out "$OUT/decode.json"
part decode_quant 90 "${DECODE[@]}" --batches $BATCHES --quant int4 int8 --no-hf --bandwidth-GBps "$BW" \
  --out "$OUT/decode_quant.json"
part decode_mma 120 "${DECODE[@]}" --batches $BATCHES --quant int4-mma int8-mma none-gemv none-dmma --no-hf \
  --bandwidth-GBps "$BW" --out "$OUT/decode_mma.json"
part decode_drafts 60 "${DECODE[@]}" --batches 1 --quant int4-head int4-vocab --no-hf --bandwidth-GBps "$BW" \
  --out "$OUT/decode_drafts.json"
# The RMSNorms, GeGLU and RoPE (with the cache write) as kernels of their own instead of in the linears (where a
# CUDA GEMV runs: batch 1), and the kernels launched programmatically (each scheduled while the one before it
# finishes), against decode_quant's batch-1 rows: what the fusion and the launch mode buy end to end.
part decode_unfused 75 "${DECODE[@]}" --batches 1 --quant int4-unfused int8-unfused int4-pdl int8-pdl --no-hf \
  --bandwidth-GBps "$BW" --out "$OUT/decode_unfused.json"

# Where the decode steps spend their device time: the top kernels of eager steps (torch.profiler).
part decode_profile 60 "${DECODE[@]}" --batches 1 64 --quant none int4 --profile --out "$OUT/decode_profile.json"

GEMFORGE_BENCH_LOG="$OUT/kernels-triton.jsonl" part kernel_triton 75 $PY -m pytest $BENCH_ARGS "$ROOT/benchmarks/kernels" \
  --ignore="$ROOT/benchmarks/kernels/bench_cuda_ops.py" --benchmark-json="$OUT/kernels-triton.json"

part throughput 60 $PY "$ROOT/benchmarks/engine/bench_throughput.py" --model "$ROOT/models/nano-codegemma" \
  --concurrency 1 8 64 --repeats 2 --staggered 64 --out "$OUT/throughput.json"

part prefill 20 $PY "$ROOT/benchmarks/engine/bench_prefill.py" --model "$ROOT/models/nano-codegemma" \
  --lengths 512 2000 --out "$OUT/prefill.json"

# The attention kernel's tile table against a sweep of tiles and split-K partitions on the CodeGemma shapes
# (each config's output checked): what to change in kernels/attention.py's table.
part sweep_attention 150 $PY "$ROOT/benchmarks/kernels/sweep_attention.py" "$OUT/sweep_attention.jsonl" \
  --bandwidth-GBps "$BW"

# Speculative decoding end to end on the bundled pair (draft model, int4 draft, pruned draft vocabulary, prompt
# lookup; CUDA graphs, the engine's own host work): what the verify-window costs above leave out.
part speculative 90 $PY "$ROOT/benchmarks/engine/bench_speculative.py" --target "$ROOT/models/nano-codegemma" \
  --draft "$ROOT/models/nano-codegemma-draft" --ks 2 4 --max-tokens 128 --repeats 2 --draft-vocab-sizes 2048 \
  --out "$OUT/speculative.json"

# HF's best configuration: its decode step compiled (static cache), at batch 1, beside gemforge measured again
# in the same process. Compiling takes minutes a shape: last, on what the budget leaves, or alone by SUITE_ONLY.
part decode_hf_compiled 300 "${DECODE[@]}" --batches 1 --quant none --hf-compile --bandwidth-GBps "$BW" \
  --out "$OUT/decode_hf_compiled.json"

part summary 25 $PY "$ROOT/benchmarks/summarize.py" "$OUT"
if [ -n "$PACK" ]; then
  mkdir -p "$PACK" && tar czf "$PACK/suite.tgz" -C "$OUT" . && cp "$OUT"/{status.txt,suite.log} "$PACK"/ \
    && { [ ! -f "$OUT/summary.md" ] || cp "$OUT/summary.md" "$PACK"/; }
fi
cat "$STATUS"
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
