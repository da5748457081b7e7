"""OpenVINO backend (`backend: "openvino"`, the name Triton's OpenVINO backend uses): one compiled model
per model instance, on the CPU plugin, reading the ONNX file directly (FP32 or
QDQ INT8; OpenVINO runs the quantized pairs as INT8 kernels).

The batch dimension stays dynamic, bounded by the config's max_batch_size so the CPU plugin can plan
for the sizes the batcher sends. Config parameters: `intra_op_thread_count` (the server-wide default
otherwise, as for ONNX Runtime) or OpenVINO's own `INFERENCE_NUM_THREADS`; `NUM_STREAMS` and
`PERFORMANCE_HINT` pass through. Inference precision is pinned to f32: on CPUs with bfloat16 support
(this one has avx512_bf16) OpenVINO would otherwise run FP32 models in bfloat16 and serve different
numbers than the graph's. A model OpenVINO cannot read or compile fails to load with OpenVINO's
reason; the other models keep serving.

Overlap: each instance holds one infer request more than the streams the CPU plugin chose
(OPTIMAL_NUMBER_OF_INFER_REQUESTS) and takes that many executions at once (`concurrent_executions`),
so the batcher copies the next batch into a free request while the current one computes. Inputs are
shared with OpenVINO, not copied (`share_inputs`: the request reads the batch buffer or the message
bytes in place); outputs are copied once, out of the request's buffers, which its next batch reuses.

Cold start: with the repository's cache directory (BackendOptions.cache_dir) the compiled model is kept
in `<cache_dir>/openvino/<sha256 of the model file>` (OpenVINO's CACHE_DIR), so a second load imports
the blob instead of compiling, and a changed file (another hash) never meets a blob of its old self.
"""

from __future__ import annotations

import logging
import queue
from pathlib import Path
from typing import Any

import numpy as np

from cnncore.artifacts import file_sha256
from cnncore.runtime import OpenVinoSettings, RuntimeUnavailable, compile_openvino, import_openvino
from server.backends.base import Backend, BackendOptions, BackendUnavailable, TensorSpec, register_backend

# config parameters handed to compile_model as they are (OpenVINO property names)
_PASSTHROUGH = ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT")

log = logging.getLogger("cnnserve.openvino")


def compiled_cache_dir(cache_root: Path, model_file: Path) -> Path | None:
    """`<cache_root>/openvino/<sha256 of the file>`, created; None (no cache, the load goes on) where it
    cannot be made, e.g. a read-only repository."""
    where = cache_root / "openvino" / file_sha256(model_file)
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("no compiled-model cache", extra={"path": str(where), "error": str(exc)})
        return None
    return where


def _import_openvino() -> Any:
    try:
        return import_openvino()
    except RuntimeUnavailable as exc:
        raise BackendUnavailable(str(exc)) from None


def _spec(port: Any, batched: bool) -> TensorSpec:
    shape = port.get_partial_shape()
    dims = [d.get_length() if d.is_static else -1 for d in shape]
    if batched:
        dims = dims[1:]
    return TensorSpec(port.get_any_name(), np.dtype(port.get_element_type().to_dtype()), tuple(dims))


def _reason(exc: Exception) -> str:
    """OpenVINO's message minus its source-location lines ("Exception from src/...", "Check ... failed
    at ..."), joined on one line: what failed to convert or compile, and why."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from src/", "Check '"))]
    return " ".join(useful or lines) or type(exc).__name__


class OpenVinoBackend(Backend):
    kind = "openvino"

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        super().__init__(model_file, options)
        _import_openvino()
        if options.device_kind == "gpu" or options.accelerators:
            raise BackendUnavailable(
                "the openvino backend serves on the CPU only (instance_group KIND_CPU, no execution_accelerators)"
            )
        params = dict(options.extra)
        config: dict[str, object] = OpenVinoSettings().properties()
        if options.intra_op_threads > 0:
            config["INFERENCE_NUM_THREADS"] = options.intra_op_threads
        for key in _PASSTHROUGH:
            if key in params:
                config[key] = params[key]
        if options.cache_dir is not None and (cached := compiled_cache_dir(options.cache_dir, model_file)):
            config["CACHE_DIR"] = str(cached)
        try:
            # bounded dynamic batch: [1..max_batch_size] on every input's first dimension
            self.compiled = compile_openvino(
                model_file, config, max_batch=options.max_batch_size if options.batched else 0
            )
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for bad graphs
            raise RuntimeError(f"openvino could not compile {model_file}: {_reason(exc)}") from exc
        # one request per stream computing, plus one being filled with the next batch
        self.concurrent_executions = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) + 1
        # last in, first out: a lone execution always meets the request used last (warm, its buffers
        # sized); the spare ones only serve when executions overlap
        self._requests: queue.LifoQueue = queue.LifoQueue()
        for _ in range(self.concurrent_executions):
            self._requests.put(self.compiled.create_infer_request())
        self._inputs = [_spec(p, options.batched) for p in self.compiled.inputs]
        self._outputs = [_spec(p, options.batched) for p in self.compiled.outputs]
        self._input_ports = {s.name: p for s, p in zip(self._inputs, self.compiled.inputs, strict=True)}
        self._output_ports = [(s.name, p) for s, p in zip(self._outputs, self.compiled.outputs, strict=True)]

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        # The batch bound is the data plane's (check_declared) and warm-up's: checked once, before here.
        for name, arr in inputs.items():
            if arr.dtype == np.object_:
                raise ValueError(f"input '{name}': BYTES tensors are not supported by the openvino backend")

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._requests.get()  # never waits: the batcher runs at most concurrent_executions at once
        try:
            results = request.infer({self._input_ports[k]: v for k, v in inputs.items()}, share_inputs=True)
            # copies: the request's output buffers are reused by its next batch
            return {name: np.array(results[port]) for name, port in self._output_ports}
        finally:
            self._requests.put(request)

    def close(self) -> None:
        self._requests = queue.LifoQueue()
        self.compiled = None


register_backend("openvino", OpenVinoBackend)
