"""Which GPU an engine is built for."""

from __future__ import annotations

from dataclasses import dataclass

from export.tensorrt.errors import BuildError


@dataclass(frozen=True)
class GpuInfo:
    compute_capability: str  # "8.6"
    name: str


def probe_gpu(device_id: int = 0) -> GpuInfo:
    """Compute capability of the GPU the engine is built for, from cuda-python (what the engine code
    uses) or NVML; BuildError when neither sees a GPU."""
    try:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(device_id)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return GpuInfo(f"{props.major}.{props.minor}", name.rstrip("\x00"))
    except ImportError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            return GpuInfo(f"{major}.{minor}", str(pynvml.nvmlDeviceGetName(handle)))
        finally:
            pynvml.nvmlShutdown()
    except (ImportError, Exception) as exc:  # pynvml raises NVMLError subclasses when no driver
        raise BuildError(f"no CUDA GPU found to build for (cuda-python / NVML: {exc})") from None
