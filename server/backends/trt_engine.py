"""Native TensorRT backend: one engine runner (cnncore/trt_runtime.py) per instance.

TensorRT and cuda-python are imported when a model asks for this backend, never at server start: a
machine without them fails that model with BackendUnavailable and serves the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnncore import trt_runtime
from cnncore.engine_manifest import EngineMismatch
from server.backends.base import Backend, BackendOptions, BackendUnavailable, TensorSpec, register_backend


def resolve_engine_file(model_file: Path, compute_capability: str, tensorrt_version: str) -> Path:
    """cnncore.trt_runtime.resolve_engine_file, with a mismatch refused as BackendUnavailable so the
    loader fails this model and keeps the others."""
    try:
        return trt_runtime.resolve_engine_file(model_file, compute_capability, tensorrt_version)
    except EngineMismatch as exc:
        raise BackendUnavailable(str(exc)) from None


class TensorRTBackend(Backend):
    kind = "tensorrt"

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        super().__init__(model_file, options)
        try:
            self._runner = trt_runtime.EngineRunner(self.model_file, options.device_id, batched=options.batched)
        except trt_runtime.TensorRTUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None
        self.max_batch = self._runner.max_batch
        self._inputs = [TensorSpec(t.name, t.dtype, t.shape) for t in self._runner.inputs]
        self._outputs = [TensorSpec(t.name, t.dtype, t.shape) for t in self._runner.outputs]

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runner.execute(inputs)

    def close(self) -> None:
        self._runner.close()


register_backend("tensorrt", TensorRTBackend)
