"""Serving a model from its engines: config.pbtxt pointed at backend tensorrt on the GPU."""

from __future__ import annotations

from pathlib import Path

from cnncore.engine_manifest import EngineRecord


def activate_tensorrt(model_dir: Path, record: EngineRecord | None = None) -> Path:
    """Point a model's config.pbtxt at its TensorRT engines: backend tensorrt on KIND_GPU instances
    (instance counts kept), no default_model_filename so engines.json picks the file per GPU. The
    record's engine is also listed in Triton's own per-GPU map, cc_model_filenames, so Triton itself can
    serve the same repository."""
    from cnncore.config import load_config, retarget_to_gpu, write_config

    config = retarget_to_gpu(load_config(model_dir), "tensorrt")
    if record is not None:
        config.cc_model_filenames[record.compute_capability] = record.file
    return write_config(config, model_dir)
