#!/usr/bin/env bash
# `make gpu-check`: everything a lent GPU host runs, in one command (benchmarks/gpu_check.py says
# what). Settings come from the environment:
#   DEVICE=cuda (default) | cpu   cpu: the smoke run `make test` does, with this checkout's .venv
#   QUICK=1                       fewer shapes and repetitions (under 3 minutes on one H200)
#   OUT=DIR                       where the results go (default: benchmarks/results/gpu; a temporary
#                                 folder for DEVICE=cpu)
#   PYTHON=...                    the interpreter (default: .venv/bin/python for cpu, python3 else)
# A GPU host has torch and triton but may lack memray's other needs (deepspeed, zarr, ...), and no
# network: `make gpu-wheels` (run where pip reaches PyPI) puts them into .whl/, which travels with
# the checkout; they are installed here into /tmp/memray-site, and memray itself from this checkout
# without its dependencies (setup.py pins the CPU machines' torch, not the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    OUT=${OUT:-$(mktemp -d)}
else
    PYTHON=${PYTHON:-python3}
    OUT=${OUT:-benchmarks/results/gpu}
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/memray-site .whl/*.whl
        export PYTHONPATH=/tmp/memray-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PYTHON" -c "import memray.kernels" 2>/dev/null ||
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
status=0
"$PYTHON" benchmarks/gpu_check.py --device "$DEVICE" ${QUICK:+--quick} --out "$OUT" || status=$?
echo "gpu-check: results in $OUT" >&2
exit $status
