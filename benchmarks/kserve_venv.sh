#!/usr/bin/env bash
# A separate virtual environment with KServe 0.21 for the baseline bench_server.py --kserve compares with.
# KServe pins many packages (fastapi, uvicorn, protobuf, ...), so it never goes into the project's .venv:
# this creates $KSERVE_VENV (default .venv-kserve in the repository root, gitignored) with kserve==0.21.0,
# the onnxruntime version the project's .venv runs (so both servers run the same runtime) and numpy.
# Idempotent: an existing venv with that kserve and onnxruntime is kept. Prints the venv's python.
#
#   bash benchmarks/kserve_venv.sh            # -> /path/to/.venv-kserve/bin/python
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${KSERVE_VENV:-$ROOT/.venv-kserve}"
KSERVE_VERSION="${KSERVE_VERSION:-0.21.0}"
ORT_VERSION="$("$ROOT/.venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)')"

have() {
  "$VENV/bin/python" - "$KSERVE_VERSION" "$ORT_VERSION" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(0 if (version("kserve"), version("onnxruntime")) == tuple(sys.argv[1:3]) else 1)
PY
}

if [[ ! -x "$VENV/bin/python" ]] || ! have; then
  "$ROOT/.venv/bin/python" -m venv --clear "$VENV" >&2
  "$VENV/bin/python" -m pip install -q "kserve==$KSERVE_VERSION" "onnxruntime==$ORT_VERSION" numpy >&2
  have || { echo "kserve_venv.sh: $VENV lacks kserve==$KSERVE_VERSION / onnxruntime==$ORT_VERSION" >&2; exit 1; }
fi
echo "$VENV/bin/python"
