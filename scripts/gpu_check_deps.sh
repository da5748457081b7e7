#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, what a GPU box without it needs for scripts/gpu_check.sh:
# the server's small dependencies that a stock "torch with CUDA" image tends to lack (pydantic, the
# grpc health/reflection services, safetensors) as wheels for that box's Python, plus the ImageNet
# MobileNetV2 weights from the local cache. gpu_check.sh unpacks ./.gpu_deps onto PYTHONPATH when it
# exists, and points CNNSERVE_WEIGHTS_DIR at it. Versions are the ones this checkout runs with.
#   bash scripts/gpu_check_deps.sh [PYTHON_VERSION]    # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
DEST=.gpu_deps
PIP=".venv/bin/pip"
[ -x "$PIP" ] || PIP="python3 -m pip"
pins=$($PIP freeze --all 2>/dev/null | grep -i -E '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions|grpcio[-_]health[-_]checking|grpcio[-_]reflection|safetensors)==' || true)
[ -n "$pins" ] || { echo "gpu_check_deps: no pinned versions found (run scripts/setup.sh first)" >&2; exit 1; }
rm -rf "$DEST" && mkdir -p "$DEST"
# shellcheck disable=SC2086
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 -d "$DEST" $pins
.venv/bin/python -c "from models.weights_fetch import MOBILENET_V2_IMAGENET as w, fetch; import shutil; shutil.copy(fetch(w), '$DEST')" \
  2>/dev/null || echo "gpu_check_deps: MobileNetV2 weights not copied (mobilenet_v2 will run with random weights)" >&2
ls -1 "$DEST"
