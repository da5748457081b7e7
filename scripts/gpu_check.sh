#!/usr/bin/env bash
# GPU check (see scripts/gpu_check.py): environment report, GPU tests, the default models served through
# the GPU backend found and driven at several concurrencies, beside the CPU default, as one table.
#   bash scripts/gpu_check.sh [--cpu-only] [--quick] [--json FILE] [...]
# Uses ./.venv when it has torch, else the system python3 (a GPU box that cannot install packages).
# Bounded: the python step is killed after GPU_CHECK_TIMEOUT seconds (default 450, under 8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: no python with torch found (tried .venv/bin/python and python3)" >&2
  exit 1
fi
# Logs of CUDA/torch worker threads should not fight the benchmark for the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-450}" "$PY" scripts/gpu_check.py "$@"
