"""OpenVINO backend (`backend: "openvino"`, the name Triton's OpenVINO backend uses): one compiled model
per model instance, on the CPU plugin, reading the ONNX file directly (FP32 or
QDQ INT8; OpenVINO runs the quantized pairs as INT8 kernels).

The batch dimension stays dynamic, bounded by the config's max_batch_size so the CPU plugin can plan
for the sizes the batcher sends. Config parameters: `intra_op_thread_count` (the server-wide default
otherwise, as for ONNX Runtime) or OpenVINO's own `INFERENCE_NUM_THREADS`; `NUM_STREAMS`,
`PERFORMANCE_HINT` (LATENCY by default) and `ENABLE_CPU_PINNING` (off by default: the cores are shared
with the server's other threads and its neighbours) pass through. Inference precision is pinned to
f32: on CPUs with bfloat16 support (this one has avx512_bf16) OpenVINO would otherwise run FP32 models
in bfloat16 and serve different numbers than the graph's. A model OpenVINO cannot read or compile fails
to load with OpenVINO's reason; the other models keep serving.

Overlap: each instance holds one infer request more than the streams the CPU plugin chose
(OPTIMAL_NUMBER_OF_INFER_REQUESTS) and takes that many executions at once (`concurrent_executions`),
so the batcher copies the next batch into a free request while the current one computes.

Zero copies: every input is handed to the request as an ov.Tensor over the array's own memory (the
batcher's reused batch buffer, or a lone request's read-only view over the message bytes or the
shared-memory read), never copied; OpenVINO's own dispatcher (`share_inputs=True`) would copy a
read-only array. Each output with static per-item dimensions is computed straight into a fresh numpy
array set as the request's output tensor, which the response then reads (no copy out of the request's
buffers); an output whose dimensions depend on the data is copied once out of the request.

Settings: `openvino_settings` is the one place the compile properties come from (the server default,
the config's pass-through parameters, the cache); benchmarks build the backend itself to measure the
runtime raw, so the two cannot differ. The load logs what OpenVINO resolved them to (streams, threads,
pinning, precision, infer requests).

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
from cnncore.runtime import (
    OpenVinoSettings,
    RuntimeUnavailable,
    compile_openvino,
    compiled_properties,
    import_openvino,
)
from server.backends.base import Backend, BackendOptions, BackendUnavailable, TensorSpec, register_backend

# config parameters handed to compile_model as they are (OpenVINO property names)
_PASSTHROUGH = (
    "INFERENCE_NUM_THREADS",
    "NUM_STREAMS",
    "PERFORMANCE_HINT",
    "INFERENCE_PRECISION_HINT",
    "ENABLE_CPU_PINNING",
)

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


def openvino_settings(options: BackendOptions, model_file: Path) -> OpenVinoSettings:
    """The compile properties of an instance: the runtime layer's defaults (f32 inference precision, a
    LATENCY hint), no CPU pinning, the server's threads (or the config's intra_op_thread_count), the
    config's OpenVINO parameters
    (_PASSTHROUGH, by their property names; they win), and the repository's compiled-model cache."""
    params = dict(options.extra)
    cache = compiled_cache_dir(options.cache_dir, model_file) if options.cache_dir is not None else None
    return OpenVinoSettings(
        threads=max(0, options.intra_op_threads),
        # Unpinned (the runtime layer's default, which export measures with too): the server's own threads,
        # its clients and other processes share these cores. ENABLE_CPU_PINNING in the config turns it on.
        cache_dir=cache,
        extra={key: params[key] for key in _PASSTHROUGH if key in params},
    )


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
        self._ov = _import_openvino()
        if options.device_kind == "gpu" or options.accelerators:
            raise BackendUnavailable(
                "the openvino backend serves on the CPU only (instance_group KIND_CPU, no execution_accelerators)"
            )
        self.settings = openvino_settings(options, model_file)
        try:
            # bounded dynamic batch: [1..max_batch_size] on every input's first dimension
            self.compiled = compile_openvino(
                model_file,
                self.settings.properties(),
                device=self.settings.device,
                max_batch=options.max_batch_size if options.batched else 0,
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
        self._input_ports = {
            s.name: (p, p.get_element_type()) for s, p in zip(self._inputs, self.compiled.inputs, strict=True)
        }
        self._output_ports = [(s, p) for s, p in zip(self._outputs, self.compiled.outputs, strict=True)]
        self.properties = compiled_properties(self.compiled)
        log.info(
            "openvino model compiled",
            extra={
                "model_file": str(model_file),
                "properties": self.properties,
                "infer_requests": self.concurrent_executions,
            },
        )

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        # The batch bound is the data plane's (check_declared) and warm-up's: checked once, before here.
        for name, arr in inputs.items():
            if arr.dtype == np.object_:
                raise ValueError(f"input '{name}': BYTES tensors are not supported by the openvino backend")

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._requests.get()  # never waits: the batcher runs at most concurrent_executions at once
        try:
            return self._infer(request, inputs)
        finally:
            self._requests.put(request)

    def warm_up(self, inputs: dict[str, np.ndarray]) -> int:
        # Each infer request keeps its own buffers per batch shape and `execute` takes the one returned
        # last, so a sample run once would warm one request and the spare ones would grow on their first
        # batches under load (+18 to 20 MiB per model in a 60 s soak at concurrency 8 before this).
        held = [self._requests.get() for _ in range(self.concurrent_executions)]
        try:
            for request in held:
                self._infer(request, inputs)
        finally:
            for request in held:
                self._requests.put(request)
        return len(held)

    def _infer(self, request: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ov = self._ov
        batch = 0
        for name, arr in inputs.items():
            port, elem = self._input_ports[name]
            arr = np.ascontiguousarray(arr)  # the batcher's are; a no-op then
            batch = arr.shape[0] if arr.ndim else 0
            if arr.dtype == elem.to_dtype():
                # over the array's memory even when it is read-only (a view over the message bytes):
                # OpenVINO reads inputs, never writes them
                request.set_tensor(port, ov.Tensor(arr, arr.shape, elem))
            else:  # another dtype than the graph's: OpenVINO converts into its own buffer
                request.set_tensor(port, ov.Tensor(arr.astype(elem.to_dtype())))
        outputs: dict[str, np.ndarray] = {}
        for spec, port in self._output_ports:
            if -1 in spec.shape:
                continue
            # a fresh array per execution: the response reads it after the request's next batch
            out = np.empty((batch, *spec.shape) if self.options.batched else spec.shape, spec.dtype)
            request.set_tensor(port, ov.Tensor(out, shared_memory=True))
            outputs[spec.name] = out
        request.infer(share_outputs=True)
        for spec, port in self._output_ports:
            if spec.name not in outputs:  # data-dependent dimensions: copied out of the request's buffer
                outputs[spec.name] = np.array(request.get_tensor(port).data)
        return {spec.name: outputs[spec.name] for spec, _ in self._output_ports}

    def close(self) -> None:
        self._requests = queue.LifoQueue()
        self.compiled = None


register_backend("openvino", OpenVinoBackend)
