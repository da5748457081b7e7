"""Runners: an ONNX file on a runtime as one callable, numpy batch in, output name -> numpy out.

The accuracy gate, export's variant choice, the evaluators and the benchmarks all measure a file this
way, so what they measure is the runtime and its settings, never a different way of calling it. A
runner feeds its model's first input and casts the batch to that input's dtype; it returns every output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnncore.runtime.ort import OrtSettings, numpy_dtype, ort_session
from cnncore.runtime.ov import OpenVinoSettings, compile_openvino, openvino_available

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]
RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")


class OrtRunner:
    """An InferenceSession as a runner; `session` stays reachable for what a runner does not cover."""

    def __init__(self, session: Any) -> None:
        self.session = session
        first = session.get_inputs()[0]
        self.input_name: str = first.name
        self.input_dtype = numpy_dtype(first.type)
        self.input_shape: list[int | str | None] = list(first.shape[1:])  # per item; names for dynamic dims
        self.output_names = [o.name for o in session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        feed = {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))


class OpenVinoRunner:
    """A compiled OpenVINO model and one infer request as a runner (outputs copied: the request's
    buffers are reused by the next call)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        first = compiled.inputs[0]
        self.input_name: str = first.get_any_name()
        self.input_dtype = np.dtype(first.get_element_type().to_dtype())
        self.input_shape: list[int | None] = [
            d.get_length() if d.is_static else None for d in list(first.get_partial_shape())[1:]
        ]
        self._outputs = [(o.get_any_name(), o) for o in compiled.outputs]
        self.output_names = [name for name, _ in self._outputs]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        res = self.request.infer({0: np.ascontiguousarray(x, dtype=self.input_dtype)})
        return {name: np.array(res[port]) for name, port in self._outputs}


# The settings are frozen dataclasses: one shared default instance is safe.
_ORT_DEFAULTS = OrtSettings()
_OPENVINO_DEFAULTS = OpenVinoSettings()


def ort_runner(path: str | Path | bytes, settings: OrtSettings = _ORT_DEFAULTS) -> OrtRunner:
    return OrtRunner(ort_session(path, settings))


def openvino_runner(path: str | Path, settings: OpenVinoSettings = _OPENVINO_DEFAULTS) -> OpenVinoRunner:
    return OpenVinoRunner(compile_openvino(path, settings.properties(), device=settings.device))


def available_runtimes() -> list[str]:
    return [r for r in RUNTIMES if r != "openvino" or openvino_available()]


def runner(path: str | Path, runtime: str, threads: int = 0) -> OrtRunner | OpenVinoRunner:
    """`path` on `runtime` ("onnxruntime" | "openvino") with the serving defaults and `threads` intra-op
    threads (0: the runtime's default)."""
    if runtime == "onnxruntime":
        return ort_runner(path, OrtSettings(intra_op_threads=threads, inter_op_threads=1))
    if runtime == "openvino":
        return openvino_runner(path, OpenVinoSettings(threads=threads))
    raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")


def throughput(
    run: Runner, sample: np.ndarray, batch: int, seconds: float = 0.5, warmup: bool = True, min_runs: int = 2
) -> float:
    """Images per second of `run` on `batch` copies of `sample` (one item, no batch dimension).

    Runs for `seconds` and at least `min_runs` times, after one warm-up run unless `warmup` is False
    (a caller measuring in rounds warms up once)."""
    x = np.ascontiguousarray(np.repeat(sample[None], batch, axis=0))
    if warmup:
        run(x)
    n, t0 = 0, time.perf_counter()
    while True:
        run(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= min_runs:
            return n * batch / elapsed


def throughput_by_batch(
    run: Runner, sample: np.ndarray, batch_sizes: Sequence[int], seconds: float = 0.5
) -> dict[int, float]:
    """Images per second at each batch size, `seconds` (and at least two runs) each."""
    return {b: throughput(run, sample, b, seconds) for b in batch_sizes}
