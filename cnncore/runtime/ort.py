"""ONNX Runtime sessions: the settings, the execution providers a config asks for, the factory.

One place sets a session up, so the server's backend, export's checks and the evaluators run a file
alike. The defaults are the server's: full graph optimisation, sequential execution, intra-op threads
that do not spin (spinning threads keep cores busy between runs and, in a server, take them from the
event loop: measured on the 2-core box with MobileNetV2 at concurrency 8, 15-20 ms CPU per image without
spinning, 24-27 ms with it, and 2-3x the throughput). onnxruntime is imported when a session is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cnncore.runtime.errors import RuntimeUnavailable

if TYPE_CHECKING:
    import onnxruntime

# An execution provider as InferenceSession takes it: a name, or a name and its options.
Provider = str | tuple[str, dict[str, str]]
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
OPENVINO_PROVIDER = "OpenVINOExecutionProvider"

# Triton's onnxruntime backend names: optimization.execution_accelerators -> execution provider.
ACCELERATOR_PROVIDERS: dict[str, str] = {
    "tensorrt": TENSORRT_PROVIDER,
    "cuda": CUDA_PROVIDER,
    "openvino": OPENVINO_PROVIDER,
}

ExecutionMode = Literal["sequential", "parallel"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]


@dataclass(frozen=True)
class OrtSettings:
    """How one InferenceSession runs."""

    intra_op_threads: int = 0  # 0: onnxruntime's default (one thread per physical core)
    inter_op_threads: int = 0  # used by execution_mode "parallel" only
    allow_spinning: bool = False
    execution_mode: ExecutionMode = "sequential"
    graph_optimization: GraphOptimization = "all"
    log_severity: int | None = None  # 0 verbose .. 4 fatal; None: onnxruntime's default (2, warnings)
    providers: tuple[Provider, ...] = (CPU_PROVIDER,)

    def session_options(self) -> onnxruntime.SessionOptions:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.execution_mode = {
            "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
            "parallel": ort.ExecutionMode.ORT_PARALLEL,
        }[self.execution_mode]
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        if self.log_severity is not None:
            so.log_severity_level = self.log_severity
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        return so


def ort_session(model: str | Path | bytes, settings: OrtSettings = OrtSettings()) -> onnxruntime.InferenceSession:
    """An InferenceSession on a file (or serialized bytes) with `settings`."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=settings.session_options(), providers=list(settings.providers))


def requested_providers(
    accelerators: Sequence[tuple[str, Mapping[str, str]]] = (), *, gpu: bool = False, device_id: int = 0
) -> list[tuple[str, dict[str, str]]]:
    """The providers a model config asks for, with their options, the way Triton's onnxruntime backend
    reads a config (CPU not included; nothing checked against this machine).

    `accelerators`: optimization.execution_accelerators as (name, parameters) in the config's order;
    `gpu`: instance_group KIND_GPU, which means the CUDA provider. TensorRT's `precision_mode: FP16`
    and `max_workspace_size_bytes` become its trt_* options; other parameters pass through as provider
    options, and the CUDA and TensorRT providers get the instance's device_id unless a parameter sets it.
    """
    providers: list[tuple[str, dict[str, str]]] = []
    for name, params in accelerators:
        ep = ACCELERATOR_PROVIDERS.get(name.lower())
        if ep is None:
            raise RuntimeUnavailable(
                f"execution accelerator {name!r} is not supported by onnxruntime "
                f"(known: {', '.join(ACCELERATOR_PROVIDERS)})"
            )
        opts = dict(params)
        if ep in (TENSORRT_PROVIDER, CUDA_PROVIDER):
            opts.setdefault("device_id", str(device_id))
        if ep == TENSORRT_PROVIDER:
            if opts.pop("precision_mode", "").upper() == "FP16":
                opts["trt_fp16_enable"] = "True"
            if "max_workspace_size_bytes" in opts:
                opts["trt_max_workspace_size"] = opts.pop("max_workspace_size_bytes")
        providers.append((ep, opts))
    if gpu and not any(ep == CUDA_PROVIDER for ep, _ in providers):
        providers.append((CUDA_PROVIDER, {"device_id": str(device_id)}))
    return providers


def ort_providers(
    accelerators: Sequence[tuple[str, Mapping[str, str]]] = (), *, gpu: bool = False, device_id: int = 0
) -> tuple[Provider, ...]:
    """requested_providers, then the CPU provider last, for OrtSettings.providers.

    A provider this onnxruntime build lacks raises RuntimeUnavailable naming it, rather than letting
    onnxruntime fall back to the CPU without a word."""
    import onnxruntime as ort

    providers = requested_providers(accelerators, gpu=gpu, device_id=device_id)
    available = set(ort.get_available_providers())
    missing = [ep for ep, _ in providers if ep not in available]
    if missing:
        raise RuntimeUnavailable(
            f"onnxruntime on this machine lacks {', '.join(missing)} (available: {', '.join(sorted(available))}); "
            "install onnxruntime-gpu with CUDA/TensorRT, or serve the model on KIND_CPU"
        )
    return (*providers, CPU_PROVIDER)


def numpy_dtype(ort_type: str) -> np.dtype:
    """numpy's dtype for an ONNX Runtime type string ("tensor(float)" -> float32).

    ONNX element names are numpy's apart from float, double and string; no protocol table here, so a
    process that cannot load the project's protos (beside tritonclient's) can still build a runner."""
    element = ort_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64", "string": "object"}.get(element, element))
