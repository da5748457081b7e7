#!/usr/bin/env bash
# The README's first command: install, build the default model repository if it is missing, start
# the server on the CPU default (ONNX Runtime), send it a real photo, then keep serving (Ctrl-C stops).
#   SERVE_ONCE=1 scripts/serve.sh   answers the example requests, then shuts the server down.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=${MODEL_REPOSITORY:-model_repository}
GRPC_PORT=${GRPC_PORT:-8001}
HTTP_PORT=${HTTP_PORT:-8000}
METRICS_PORT=${METRICS_PORT:-8002}
PY=.venv/bin/python

bash scripts/setup.sh
if [ ! -d "$REPO" ]; then
  echo "== building the default model repository in $REPO (one-off, a few minutes)"
  "$PY" -m export repository --repository "$REPO"
fi
"$PY" scripts/make_examples.py --out examples >/dev/null
echo "== what is served: precision and runtime chosen by measurement, INT8 only where it passed the accuracy gate"
"$PY" -m export list --repository "$REPO" --served

echo "== starting the server: gRPC 127.0.0.1:$GRPC_PORT, REST http://127.0.0.1:$HTTP_PORT/v2, metrics http://127.0.0.1:$METRICS_PORT/metrics"
"$PY" -m server --model-repository "$REPO" --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" --metrics-port "$METRICS_PORT" \
  --log-format text &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
CLIENT=("$PY" -m client --url "127.0.0.1:$GRPC_PORT")
for _ in $(seq 1 120); do
  "${CLIENT[@]}" health >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited during start-up" >&2; exit 1; }
  sleep 1
done

echo "== classify a real photo (examples/chelsea.jpg) with the ImageNet MobileNetV2"
"${CLIENT[@]}" classify mobilenet_v2 examples/chelsea.jpg --top-k 3
echo "== detect shapes in a generated picture, annotated picture -> examples/shapes.detected.png"
"${CLIENT[@]}" detect shapes_detector examples/shapes.png --score-threshold 0.5 --out-image examples/shapes.detected.png

if [ -n "${SERVE_ONCE:-}" ]; then exit 0; fi
echo "== serving; Ctrl-C to stop"
wait $SERVER
