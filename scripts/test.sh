#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite (slow tests included), then
# the precision-sensitive tests (`-m precision`: INT8/BF16 kernels, the default repository's build and
# choice) a second time with AMX and AVX-512 BF16 hidden from oneDNN (ONEDNN_MAX_CPU_ISA), as on a CPU
# without them: CI machines are not all of one kind. CNNSERVE_SKIP_ISA_PASS=1 skips the second pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
if [ "${CNNSERVE_SKIP_ISA_PASS:-0}" != "1" ]; then
    echo "== precision-sensitive tests again under ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI (no AMX, no BF16) =="
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI .venv/bin/python -m pytest -m precision "$@"
fi
