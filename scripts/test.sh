#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
