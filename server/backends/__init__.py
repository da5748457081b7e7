"""Backends register themselves on import; the loader imports this package to make them available.

A backend whose library is missing on this machine simply does not register (or raises
BackendUnavailable when a model asks for it), so the CPU-only image still starts.
"""
from server.backends import ort_backend  # noqa: F401  (registers "onnxruntime")
# The GPU backends import TensorRT / cuda-python / torch only when a model asks for them.
from server.backends import torch_program  # noqa: F401,E402  (registers "pytorch")
from server.backends import trt_engine  # noqa: F401,E402  (registers "tensorrt")
