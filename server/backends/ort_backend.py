"""ONNX Runtime backend: one InferenceSession per model instance.

CPU execution provider by default; config parameters `intra_op_thread_count`, `inter_op_thread_count`
and `intra_op_allow_spinning` (0/1) tune it. A config asks for others the way Triton's onnxruntime backend does:
instance_group kind KIND_GPU -> CUDA EP; optimization.execution_accelerators gpu "tensorrt" -> TensorRT
EP, cpu "openvino" -> OpenVINO EP. A provider this onnxruntime build lacks fails the model's load with
BackendUnavailable naming what is missing, rather than silently running on the CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.backends.base import Backend, BackendOptions, BackendUnavailable, TensorSpec, register_backend
from cnncore.datatypes import from_ort, to_numpy

_ACCELERATOR_EP = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


def _providers(options: BackendOptions) -> list[str | tuple[str, dict]]:
    providers: list[str | tuple[str, dict]] = []
    for name, params in options.accelerators:
        ep = _ACCELERATOR_EP.get(name.lower())
        if ep is None:
            raise BackendUnavailable(
                f"execution accelerator {name!r} is not supported by the onnxruntime backend "
                f"(known: {', '.join(_ACCELERATOR_EP)})"
            )
        opts = dict(params)
        if ep in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            opts.setdefault("device_id", str(options.device_id))
        if ep == "TensorrtExecutionProvider" and opts.pop("precision_mode", "").upper() == "FP16":
            opts["trt_fp16_enable"] = "True"
        providers.append((ep, opts))
    if options.device_kind == "gpu" and not any(p[0] == "CUDAExecutionProvider" for p in providers):
        providers.append(("CUDAExecutionProvider", {"device_id": str(options.device_id)}))
    available = set(ort.get_available_providers())
    missing = [p[0] for p in providers if p[0] not in available]
    if missing:
        raise BackendUnavailable(
            f"onnxruntime on this machine lacks {', '.join(missing)} (available: {', '.join(sorted(available))}); "
            "install onnxruntime-gpu with CUDA/TensorRT, or serve the model on KIND_CPU"
        )
    providers.append("CPUExecutionProvider")
    return providers


def _spec(arg: ort.NodeArg, batched: bool) -> TensorSpec:
    dims = [d if isinstance(d, int) else -1 for d in arg.shape]
    if batched:
        dims = dims[1:]
    return TensorSpec(arg.name, to_numpy(from_ort(arg.type)), tuple(dims))


def _to_ort_strings(arr: np.ndarray) -> np.ndarray:
    # The protocol's BYTES elements arrive as Python bytes; ONNX Runtime would str() them ("b'..'"),
    # so hand it text. Its string tensors are UTF-8: check_inputs rejects other bytes before queueing.
    out = np.empty(arr.shape, dtype=np.object_)
    out.reshape(-1)[:] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    return out


def _from_ort_strings(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=np.object_)
    out.reshape(-1)[:] = [x.encode("utf-8") if isinstance(x, str) else x for x in arr.reshape(-1)]
    return out


class OrtBackend(Backend):
    kind = "onnxruntime"

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        super().__init__(model_file, options)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        # Batches of different sizes arrive in any order; ORT's default arena grows to the largest
        # and keeps it, which is what a server wants (no per-request allocation).
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads keep cores busy between runs; in a server they steal those cores
        # from the event loop that receives and answers requests (measured on the 2-core box with
        # MobileNetV2 at concurrency 8: 15-20 ms CPU per image without spinning, 24-27 ms with it, and
        # 2-3x the throughput). Off unless the config or the CLI turns it on.
        spin = dict(options.extra).get("intra_op_allow_spinning", "0")
        if spin not in ("0", "1"):
            raise ValueError(f"config parameter intra_op_allow_spinning must be 0 or 1, got {spin!r}")
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        providers = _providers(options)
        try:
            self.session = ort.InferenceSession(str(model_file), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt/unsupported graphs
            raise RuntimeError(f"onnxruntime could not load {model_file}: {exc}") from exc
        self._inputs = [_spec(a, options.batched) for a in self.session.get_inputs()]
        self._outputs = [_spec(a, options.batched) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        for name, arr in inputs.items():
            if arr.dtype != np.object_:
                continue
            for i, x in enumerate(arr.reshape(-1)):
                try:
                    x.decode("utf-8") if isinstance(x, bytes) else None
                except UnicodeDecodeError as exc:
                    raise ValueError(f"input '{name}': BYTES element {i} is not UTF-8 ({exc.reason}); "
                                     "ONNX Runtime string tensors hold UTF-8 text") from None

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: _to_ort_strings(v) if v.dtype == np.object_ else v for k, v in inputs.items()}
        results = self.session.run(self._output_names, feed)
        return {k: _from_ort_strings(v) if v.dtype == np.object_ else v for k, v in zip(self._output_names, results)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


register_backend("onnxruntime", OrtBackend)
