"""Running a serialized TensorRT engine: the one runner the server's tensorrt backend and the engine
builder's parity check share.

Memory is managed with NVIDIA's cuda-python (`cuda.bindings.runtime`): device buffers sized for the
profile's max batch are allocated once and bound to the context with set_tensor_address, host staging
buffers are pinned (cudaMallocHost) so copies are real async DMA on the runner's own CUDA stream, and
each batch only sets the input shapes (within the profile) and enqueues copy-in, execute_async_v3,
copy-out. TensorRT and cuda-python are imported when an engine is opened, never at import: a machine
without them gets TensorRTUnavailable naming what is missing.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncore.artifacts import PLAN_FILENAME
from cnncore.engine_manifest import EngineManifest, EngineMismatch, select_engine


class TensorRTUnavailable(RuntimeError):
    """This machine cannot run the engine (no TensorRT, no cuda-python, no GPU, or no engine built for
    this GPU and TensorRT); the message says which."""


def cudart() -> Any:
    """cuda-python's runtime module, imported on first use (untyped: the GPU image brings it)."""
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise TensorRTUnavailable(f"the tensorrt backend needs NVIDIA's cuda-python (cuda-bindings): {exc}") from None
    return runtime


def check_cuda(result: Any) -> Any:
    """cuda-python returns (cudaError_t, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, name = cudart().cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {int(err)} ({name.decode() if isinstance(name, bytes) else name})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class DeviceBuffer:
    """cudaMalloc'd memory of a fixed size."""

    def __init__(self, nbytes: int) -> None:
        self._cudart = cudart()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check_cuda(self._cudart.cudaMalloc(self.nbytes)))

    def copy_from_host(self, array: np.ndarray, stream: int = 0) -> None:
        array = np.ascontiguousarray(array)
        check_cuda(
            self._cudart.cudaMemcpyAsync(
                self.ptr, array.ctypes.data, array.nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream
            )
        )
        check_cuda(self._cudart.cudaStreamSynchronize(stream))

    def free(self) -> None:
        if self.ptr:
            check_cuda(self._cudart.cudaFree(self.ptr))
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory with a numpy view: the host side of async copies."""

    def __init__(self, nbytes: int) -> None:
        self._cudart = cudart()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check_cuda(self._cudart.cudaMallocHost(self.nbytes)))
        self._raw: memoryview | None = memoryview((ctypes.c_byte * self.nbytes).from_address(self.ptr)).cast("B")

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        assert self._raw is not None, "view of a freed buffer"
        count = int(np.prod(shape))
        return np.frombuffer(self._raw, dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self._raw = None
            check_cuda(self._cudart.cudaFreeHost(self.ptr))
            self.ptr = 0


def local_tensorrt_version() -> str:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"the tensorrt backend needs TensorRT, which is not installed here ({exc}); "
            "serve this model with backend onnxruntime or pytorch instead"
        ) from None
    return str(trt.__version__)


def local_compute_capability(device_id: int) -> str:
    err, props = cudart().cudaGetDeviceProperties(device_id)
    if int(err) != 0:
        raise TensorRTUnavailable(
            f"the tensorrt backend needs a CUDA GPU; device {device_id} is not available (CUDA error {int(err)})"
        )
    return f"{props.major}.{props.minor}"


def resolve_engine_file(model_file: Path, compute_capability: str, tensorrt_version: str) -> Path:
    """The engine to load for `model_file` on this GPU.

    model_file is a version directory (the engine is chosen from its engines.json; a lone Triton-style
    model.plan without manifest is taken as is) or an engine file (checked against the manifest when one
    lists it). A mismatch is raised as EngineMismatch with the manifest's message.
    """
    model_file = Path(model_file)
    if model_file.is_dir():
        if not EngineManifest.read(model_file).engines and (model_file / PLAN_FILENAME).is_file():
            return model_file / PLAN_FILENAME  # Triton's plain layout: the user vouches for it
        return model_file / select_engine(model_file, compute_capability, tensorrt_version).file
    version_dir = model_file.parent
    listed = {e.file: e for e in EngineManifest.read(version_dir).engines}
    if model_file.name in listed:
        rec = listed[model_file.name]
        chosen = select_engine(version_dir, compute_capability, tensorrt_version, precision=rec.precision)
        if chosen.file != model_file.name:
            raise EngineMismatch(
                f"{model_file}: built for compute capability {rec.compute_capability} / "
                f"TensorRT {rec.tensorrt_version}; this machine needs {chosen.file}"
            )
    elif not model_file.is_file():
        raise EngineMismatch(f"{model_file}: engine file not found")
    return model_file


@dataclass(frozen=True)
class EngineTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # without the batch dimension when the runner is batched


class EngineRunner:
    """One deserialized engine with one execution context, stream and buffer set.

    `execute` is not reentrant: a caller running several batches at once opens one runner per
    concurrent execution (the server: one per instance)."""

    def __init__(self, model_file: Path, device_id: int = 0, batched: bool = True) -> None:
        self.model_file = Path(model_file)
        trt_version = local_tensorrt_version()
        import tensorrt as trt

        self._cudart = rt = cudart()
        check_cuda(rt.cudaSetDevice(device_id))
        try:
            engine_path = resolve_engine_file(self.model_file, local_compute_capability(device_id), trt_version)
        except EngineMismatch as exc:
            raise TensorRTUnavailable(str(exc)) from None
        self.engine_path = engine_path
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise TensorRTUnavailable(f"{engine_path}: TensorRT could not deserialize the engine (see its log)")
        self._context = self._engine.create_execution_context()
        self._stream = check_cuda(rt.cudaStreamCreate())
        self.inputs: list[EngineTensor] = []
        self.outputs: list[EngineTensor] = []
        self._device: dict[str, DeviceBuffer] = {}
        self._host: dict[str, PinnedBuffer] = {}
        self.max_batch = 0
        self._batched = batched
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in input_names:
            _, _, max_shape = self._engine.get_tensor_profile_shape(name, 0)
            self.max_batch = int(max_shape[0]) if not self.max_batch else min(self.max_batch, int(max_shape[0]))
            self._context.set_input_shape(name, tuple(max_shape))
        for name in names:
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))
            spec = EngineTensor(name, dtype, shape[1:] if batched else shape)
            (self.inputs if name in input_names else self.outputs).append(spec)
            # At the profile's max input shapes, every output has its largest size: size buffers once.
            nbytes = int(np.prod(tuple(self._context.get_tensor_shape(name)))) * dtype.itemsize
            self._device[name] = DeviceBuffer(nbytes)
            self._host[name] = PinnedBuffer(nbytes)
            self._context.set_tensor_address(name, self._device[name].ptr)

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt = self._cudart
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.inputs:
            array = inputs[spec.name]
            if self._batched and array.shape[0] > self.max_batch:
                raise ValueError(f"batch {array.shape[0]} exceeds the engine profile's max batch {self.max_batch}")
            staged = self._host[spec.name].view(spec.dtype, array.shape)
            np.copyto(staged, array, casting="same_kind")
            check_cuda(
                rt.cudaMemcpyAsync(
                    self._device[spec.name].ptr, self._host[spec.name].ptr, staged.nbytes, h2d, self._stream
                )
            )
            if not self._context.set_input_shape(spec.name, tuple(array.shape)):
                raise ValueError(f"input {spec.name!r} shape {list(array.shape)} is outside the engine profile")
        if not self._context.execute_async_v3(int(self._stream)):  # TensorRT takes the raw cudaStream_t handle
            raise RuntimeError(f"{self.model_file}: TensorRT execution failed")
        shapes = {}
        for spec in self.outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(spec.name))
            shapes[spec.name] = shape
            nbytes = int(np.prod(shape)) * spec.dtype.itemsize
            check_cuda(
                rt.cudaMemcpyAsync(self._host[spec.name].ptr, self._device[spec.name].ptr, nbytes, d2h, self._stream)
            )
        check_cuda(rt.cudaStreamSynchronize(self._stream))
        # Copy out of the pinned staging buffers: they are reused by the next batch.
        return {spec.name: self._host[spec.name].view(spec.dtype, shapes[spec.name]).copy() for spec in self.outputs}

    def close(self) -> None:
        buffers: list[DeviceBuffer | PinnedBuffer] = [*self._device.values(), *self._host.values()]
        for buf in buffers:
            buf.free()
        self._device.clear()
        self._host.clear()
        if getattr(self, "_stream", None) is not None:
            check_cuda(self._cudart.cudaStreamDestroy(self._stream))
            self._stream = None
        self._context = None
        self._engine = None
