#!/usr/bin/env bash
# Triton's C++ perf_analyzer on a machine whose glibc is older than its wheel needs (2.38; Debian 12 has
# 2.36), installing nothing system-wide: the perf-analyzer wheel and Debian 13's libc6, libstdc++6 and
# libgcc-s1 are fetched once into $PA_HOME (default ~/.cache/cnnserve-perf-analyzer) with pip and apt's
# own client (a private apt state directory), unpacked there, and the binary is started through
# Debian 13's dynamic loader with those libraries first on its path.
#
#   bash benchmarks/perf_analyzer.sh -m identity_image -u 127.0.0.1:8001 -i grpc --concurrency-range 8
#   bash benchmarks/perf_analyzer.sh ... --shared-memory system --output-shared-memory-size 602112
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PA_HOME="${PA_HOME:-$HOME/.cache/cnnserve-perf-analyzer}"
PA_VERSION="${PA_VERSION:-2.59.1}"
BIN="$PA_HOME/wheel/perf_analyzer/bin/perf_analyzer"
LIB="$PA_HOME/debian13/usr/lib/x86_64-linux-gnu"

if [[ ! -x "$BIN" ]]; then
  mkdir -p "$PA_HOME/dl" "$PA_HOME/wheel"
  "$ROOT/.venv/bin/python" -m pip download "perf-analyzer==$PA_VERSION" --no-deps --only-binary=:all: \
    --platform manylinux_2_38_x86_64 --python-version 3.11 -d "$PA_HOME/dl" >&2
  (cd "$PA_HOME/wheel" && "$ROOT/.venv/bin/python" -m zipfile -e "$PA_HOME"/dl/perf_analyzer-"$PA_VERSION"-*.whl .)
  chmod +x "$BIN"
fi
if [[ ! -e "$LIB/libc.so.6" ]]; then
  apt_dir="$PA_HOME/apt"
  mkdir -p "$apt_dir/etc/sources.list.d" "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$apt_dir/etc/sources.list"
  opts=(-o "Dir::Etc::SourceList=$apt_dir/etc/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/etc/sources.list.d"
        -o "Dir::State=$apt_dir/state" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1)
  apt-get "${opts[@]}" update >&2
  (cd "$apt_dir" && apt-get "${opts[@]}" download libc6 libstdc++6 libgcc-s1 >&2)
  for deb in "$apt_dir"/*.deb; do dpkg-deb -x "$deb" "$PA_HOME/debian13"; done
fi
exec "$LIB/ld-linux-x86-64.so.2" --library-path "$LIB:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "$BIN" "$@"
