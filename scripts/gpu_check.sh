#!/usr/bin/env bash
# GPU check (see scripts/gpu_check.py): environment report, GPU tests, the default models served through
# the GPU backend found and driven at several concurrencies, beside the CPU default, as one table.
#   bash scripts/gpu_check.sh [--cpu-only] [--quick] [--json FILE] [...]
# With ./.gpu_deps (scripts/gpu_check_deps.sh) its wheels and weights are used where the box lacks them.
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
# Wheels and weights prepared by scripts/gpu_check_deps.sh on a connected machine (a GPU box often has
# torch but neither PyPI nor pydantic): unpacked into a temporary site directory, never installed.
if [ -d .gpu_deps ]; then
  SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
  # Only the wheels whose top-level packages this python lacks: never shadow what is installed.
  "$PY" - "$SITE" <<'PYEOF'
import glob, importlib.util, sys, zipfile
for wheel in sorted(glob.glob(".gpu_deps/*.whl")):
    z = zipfile.ZipFile(wheel)
    tops = {n.split("/")[0].removesuffix(".py") for n in z.namelist() if ".dist-info" not in n.split("/")[0]}
    if any(importlib.util.find_spec(t) is None for t in tops if t.isidentifier()):
        z.extractall(sys.argv[1])
        print(f"gpu_check: using {wheel.split('/')[-1]} from .gpu_deps", file=sys.stderr)
PYEOF
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export CNNSERVE_WEIGHTS_DIR=${CNNSERVE_WEIGHTS_DIR:-$PWD/.gpu_deps}
fi
# Logs of CUDA/torch worker threads should not fight the benchmark for the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-450}" "$PY" scripts/gpu_check.py "$@"
