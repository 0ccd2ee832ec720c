#!/bin/bash
# One device call: kernel tests (GPU and CPU), compute-sanitizer over a few GPU tests, then the benchmark with
# the CPU candidates (BENCH_ARGS= for the default benchmark). Usage there: bash kernels/device_check.sh
# (carry .whl for gguf; results under $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gguf-*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__, 'threads', torch.get_num_threads())"
cc --version | head -1; nproc

echo "== pytest"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q --maxfail=5 -p no:cacheprovider tests/test_kernels_*.py 2>&1 \
  | tee "$OUT/pytest.log" | tail -25

echo "== compute-sanitizer (memcheck) on a few GPU tests"
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels_cuda.py -k "segments and (q8_0 or f16) and float16 or full_length or empty_and_full" \
  >"$OUT/sanitizer.log" 2>&1; echo "sanitizer exit $?"; tail -5 "$OUT/sanitizer.log"

echo "== bench"
timeout ${BENCH_TIMEOUT:-180} python3 -m kernels.bench ${BENCH_ARGS---cpu-compare} --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | tail -150
