"""Names and fingerprints of the files a model repository holds, one definition for both halves.

export writes these files; the server and the evaluators read them. Engine file names (per GPU and
TensorRT version) live in cnncore.engine_manifest beside the manifest that lists them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ONNX_FILENAME = "model.onnx"
PROGRAM_FILENAME = "model.pt2"  # torch.export program (the torch backend)
PLAN_FILENAME = "model.plan"  # a single TensorRT engine named in config.pbtxt's default_model_filename
# The gated variants `export` keeps beside model.onnx (the served copy of one of them; export/variants.py).
FP32_FILENAME = "model.fp32.onnx"  # the FP32 parent
INT8_FILENAME = "model.int8.onnx"  # symmetric, zero point 0: TensorRT, ONNX Runtime, `export engine`
INT8_OPENVINO_FILENAME = "model.int8.openvino.onnx"  # unsigned activations (TensorRT cannot read), full bias correction
# Inside a torch.export archive: the protocol names of the program's inputs and outputs (JSON).
PROGRAM_NAMES_FILE = "cnnserve.json"


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (weights and engines run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()
