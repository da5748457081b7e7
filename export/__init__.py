"""The offline half: registry model -> ONNX (dynamo exporter) -> parity vs PyTorch -> TensorRT lint ->
Triton-layout model repository. The CLI is `python -m export` (export/export.py)."""
