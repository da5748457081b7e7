#!/usr/bin/env bash
# The fast lane: every test that is neither `slow` nor `e2e` (tests/conftest.py marks them), for a signal
# within minutes while working. CI still runs the whole suite (scripts/test.sh). Extra arguments go to
# pytest, e.g. `bash scripts/test-fast.sh -x -k imaging`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -m fast -q -p no:cacheprovider "$@"
