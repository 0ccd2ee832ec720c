#!/usr/bin/env bash
# One device call: the GPU tests, then the benchmarks named in $BENCH (default: dense). Logs and JSON go to $OUT.
# Run from the repo root on the device with .whl carried; the real model, if shipped, is in /tmp/relu-smollm2.
set -uo pipefail
source scripts/device_env.sh
export POWERINFER_TEST_CACHE=/tmp/cache
[ -d /tmp/relu-smollm2 ] && mkdir -p /tmp/cache && ln -sfn /tmp/relu-smollm2 /tmp/cache/relu-smollm2-135m
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee $OUT/gpu_tests.log | tail -25
for b in ${BENCH:-dense_decode}; do
    timeout ${BENCH_TIMEOUT:-300} python3 -m benchmarks.$b --out $OUT/$b.json 2>&1 | tee $OUT/$b.log | tail -15
done
