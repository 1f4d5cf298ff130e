#!/usr/bin/env bash
# Everything a lent GPU host should run, in one command: checks and timings of the Triton
# kernels (gpu_lookup.py) and the value-table step on CUDA (bench_value_step.py --device cuda).
# Needs only torch and triton; results go to $OUT (else benchmarks/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/gpu_lookup.py "$@"
python benchmarks/bench_value_step.py --device cuda ${QUICK:+--quick}
