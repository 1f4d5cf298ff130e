#!/usr/bin/env bash
# `make gpu-check`: everything a lent GPU host runs, in one command (benchmarks/gpu_check.py says
# what). Settings come from the environment:
#   DEVICE=cuda (default) | cpu   cpu: the smoke run `make test` does, with this checkout's .venv
#   QUICK=1                       fewer shapes and repetitions (under 3 minutes on one H200)
#   OUT=DIR                       where the results go (default: benchmarks/results/gpu; a temporary
#                                 folder for DEVICE=cpu)
#   SECTIONS=a,b                  a subset of gpu_check.py's sections
#   PYTHON=...                    the interpreter (default: .venv/bin/python for cpu, python3 else)
#   INSTALL=1                     install as on the host (the default for DEVICE=cuda; make
#                                 gpu-host-sim sets it for its CPU run): the wheels in WHEELS
#                                 (default .whl) into SITE (default /tmp/memray-site) and memray
#                                 from this checkout, all without network
# A GPU host has torch and triton but lacks some of memray's needs (benchmarks/gpu-wheels.txt), and
# has no network: `make gpu-wheels` (run where pip reaches PyPI) puts them into .whl/, which travels
# with the checkout. memray itself is installed without its dependencies (setup.py pins the CPU
# machines' torch, not the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    OUT=${OUT:-$(mktemp -d)}
    INSTALL=${INSTALL:-0}
else
    PYTHON=${PYTHON:-python3}
    OUT=${OUT:-benchmarks/results/gpu}
    INSTALL=${INSTALL:-1}
fi
if [ "$INSTALL" = 1 ]; then
    WHEELS=${WHEELS:-.whl}
    SITE=${SITE:-/tmp/memray-site}
    while read -r requirement; do
        case "$requirement" in '' | '#'*) continue ;; esac
        name=${requirement%%==*}
        version=${requirement#*==}
        file=$(echo "$name" | tr 'A-Z-' 'a-z_')-$version-
        if ! ls "$WHEELS/$file"*.whl >/dev/null 2>&1; then
            echo "gpu.sh: $WHEELS/ has no wheel of $requirement (benchmarks/gpu-wheels.txt): run make gpu-wheels where pip reaches PyPI" >&2
            exit 2
        fi
    done <benchmarks/gpu-wheels.txt
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    "$PYTHON" -c "import memray.kernels" 2>/dev/null ||
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
status=0
"$PYTHON" benchmarks/gpu_check.py --device "$DEVICE" ${QUICK:+--quick} ${SECTIONS:+--sections "$SECTIONS"} --out "$OUT" ||
    status=$?
echo "gpu-check: results in $OUT" >&2
exit $status
