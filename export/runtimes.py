"""The CPU runtimes an exported ONNX file can be served with, as plain batch runners, and their speed.

Used by the accuracy gate (metrics through the runtime that will serve the file), by `export
repository` (which measures both runtimes on the machine it runs on and serves the fastest gated
variant) and by benchmarks/bench_models.py. The sessions and compiled models come from the runtime
layer (cnncore/runtime) with the server's own defaults, so what export measures is what is served;
this module only fixes export's thread count.
"""
from __future__ import annotations

from pathlib import Path

from cnncore.runtime import (RUNTIMES, OpenVinoSettings, OrtSettings, Runner, RuntimeUnavailable, available_runtimes,
                             openvino_available, throughput)
from cnncore.runtime import openvino_runner as _openvino_runner
from cnncore.runtime import ort_runner as _ort_runner
from cnncore.runtime import runner as _runner

# Not installed here: the runtime layer's error under the name export has always caught.
RuntimeMissing = RuntimeUnavailable

__all__ = ["RUNTIMES", "Runner", "RuntimeMissing", "available_runtimes", "openvino_available", "openvino_runner",
           "ort_runner", "runner", "throughput"]


def ort_runner(path: Path, threads: int = 2) -> Runner:
    return _ort_runner(path, OrtSettings(intra_op_threads=threads, inter_op_threads=1))


def openvino_runner(path: Path, threads: int = 2) -> Runner:
    return _openvino_runner(path, OpenVinoSettings(threads=threads))


def runner(path: Path, runtime: str, threads: int = 2) -> Runner:
    return _runner(path, runtime, threads)

