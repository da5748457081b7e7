"""Backends register themselves on import; the loader imports this package to make them available.

Each module imports its heavy library (TensorRT, CUDA runtime, torch) only when a model asks for it,
so importing all of them keeps the CPU-only serving image torch-free; a missing library surfaces as
BackendUnavailable for that model alone.
"""

try:
    from server.backends import ort_backend  # noqa: F401  (registers "onnxruntime")
except ImportError as _exc:  # a GPU box without onnxruntime/protobuf still runs the torch and TensorRT backends
    import logging as _logging

    _logging.getLogger("cnnserve.backends").warning("onnxruntime backend not available: %s", _exc)
from server.backends import (
    openvino_backend,  # noqa: F401  (registers "openvino"; imports openvino at load)
    torch_program,  # noqa: F401  (registers "pytorch")
    trt_engine,  # noqa: F401  (registers "tensorrt")
)
