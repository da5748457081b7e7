#!/usr/bin/env bash
# The export service's job, idempotent so it can run at every `docker compose up`:
#   1. write the ONNX model repository if the volume has none yet;
#   2. build TensorRT engines for this GPU + TensorRT unless engines.json already lists them
#      (skipped on CPU-only deployments: EXPORT_TENSORRT=0);
#   3. leave a marker the healthcheck and the server's depends_on wait for.
set -euo pipefail
REPO=${MODEL_REPOSITORY:-/models}
PRECISION=${TRT_PRECISION:-fp16}
WORKSPACE_MIB=${TRT_WORKSPACE_MIB:-2048}
rm -f "$REPO/.export-done"
if ! compgen -G "$REPO/*/config.pbtxt" >/dev/null; then
  echo "export: no model repository in $REPO, exporting the default models"
  python -m export repository --repository "$REPO"
fi
if [ "${EXPORT_TENSORRT:-1}" = 1 ]; then
  python -m export engine --repository "$REPO" --precision "$PRECISION" \
    --workspace-mib "$WORKSPACE_MIB" --skip-existing --activate
fi
date -u +%FT%TZ > "$REPO/.export-done"
echo "export: done"
