#!/usr/bin/env bash
# Regenerates the committed protos/*_pb2.py and *_pb2_grpc.py from the .proto files.
# Run from anywhere; uses the project's venv python (or $PYTHON). `-I .` at the repository root makes
# the generated imports read `from protos import model_config_pb2`, so `protos` is a normal package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/model_config.proto $(ls protos/grpc_service.proto protos/vision.proto 2>/dev/null || true)
# model_config.proto declares no service: its empty *_pb2_grpc.py is noise.
rm -f protos/model_config_pb2_grpc.py
