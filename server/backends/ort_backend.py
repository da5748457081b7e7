"""ONNX Runtime backend: one InferenceSession per model instance.

CPU execution provider by default; config parameters `intra_op_thread_count`, `inter_op_thread_count`
and `intra_op_allow_spinning` (0/1) tune it. A config asks for others the way Triton's onnxruntime backend does:
instance_group kind KIND_GPU -> CUDA EP; optimization.execution_accelerators gpu "tensorrt" -> TensorRT
EP, cpu "openvino" -> OpenVINO EP. A provider this onnxruntime build lacks fails the model's load with
BackendUnavailable naming what is missing, rather than silently running on the CPU.

Overlap: an instance takes two executions at once (the batcher gives it two execution slots) but runs
one session at a time: `runtime_turn` is its lock, which the batcher holds around each run. While one
batch computes, the other slot gathers and copies in the next and waits on the lock, so the next run
starts the moment the current one returns, on its own thread, without a round trip through the event
loop (measured on resnet18 at concurrency 8 under load: 5.6 ms p50 between runs, 2.8% of the
instance's time idle). Two runs of one session at once would split the same cores and double each
batch's time (measured on 2 cores), hence the lock.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cnncore.datatypes import from_ort, to_numpy
from cnncore.runtime import OrtSettings, RuntimeUnavailable, ort_providers, ort_session
from server.backends.base import Backend, BackendOptions, BackendUnavailable, TensorSpec, register_backend


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
    # one running, one gathering the next batch and waiting on the run lock (module docstring)
    concurrent_executions = 2

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        super().__init__(model_file, options)
        # Spinning intra-op threads would take the event loop's cores (cnncore/runtime/ort.py): off
        # unless the config or the CLI turns it on.
        spin = dict(options.extra).get("intra_op_allow_spinning", "0")
        if spin not in ("0", "1"):
            raise ValueError(f"config parameter intra_op_allow_spinning must be 0 or 1, got {spin!r}")
        try:
            providers = ort_providers(
                [(name, dict(params)) for name, params in options.accelerators],
                gpu=options.device_kind == "gpu",
                device_id=options.device_id,
            )
        except RuntimeUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None
        # Batches of different sizes arrive in any order; ORT's default arena grows to the largest
        # and keeps it, which is what a server wants (no per-request allocation).
        settings = OrtSettings(
            intra_op_threads=options.intra_op_threads,
            inter_op_threads=options.inter_op_threads,
            allow_spinning=spin == "1",
            providers=providers,
        )
        try:
            self.session = ort_session(model_file, settings)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt/unsupported graphs
            raise RuntimeError(f"onnxruntime could not load {model_file}: {exc}") from exc
        self._inputs = [_spec(a, options.batched) for a in self.session.get_inputs()]
        self._outputs = [_spec(a, options.batched) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]
        self._run_lock = threading.Lock()

    def runtime_turn(self) -> AbstractContextManager[object]:
        return self._run_lock

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
                    raise ValueError(
                        f"input '{name}': BYTES element {i} is not UTF-8 ({exc.reason}); "
                        "ONNX Runtime string tensors hold UTF-8 text"
                    ) from None

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: _to_ort_strings(v) if v.dtype == np.object_ else v for k, v in inputs.items()}
        results = self.session.run(self._output_names, feed)
        return {
            k: _from_ort_strings(v) if v.dtype == np.object_ else v
            for k, v in zip(self._output_names, results, strict=True)
        }

    def close(self) -> None:
        self.session = None


register_backend("onnxruntime", OrtBackend)
