"""Backends register themselves on import; the loader imports this package to make them available.

Each module imports its heavy library (TensorRT, CUDA runtime, torch) only when a model asks for it,
so importing all of them keeps the CPU-only serving image torch-free; a missing library surfaces as
BackendUnavailable for that model alone.
"""
from server.backends import ort_backend  # noqa: F401  (registers "onnxruntime")
from server.backends import torch_program  # noqa: F401  (registers "pytorch")
from server.backends import trt_engine  # noqa: F401  (registers "tensorrt")
