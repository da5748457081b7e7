#!/usr/bin/env bash
# Installs what serving, export and the tests need into ./.venv. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST (Debian package) for the classifier's and autoencoder's accuracy checks.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
    echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST checks will skip" >&2
fi
# promtool and Prometheus (Debian package) for the metrics page's checks (tests/test_metrics_page.py).
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) >/dev/null || \
    echo "warning: could not install prometheus; the promtool and Prometheus scrape checks will skip" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch==2.13.0 (CPU wheel) is pinned in pyproject's `export` extra; a looser pin pulls a CUDA build.
.venv/bin/python -m pip install -q -e '.[export,dev]'
