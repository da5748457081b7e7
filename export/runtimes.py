"""The CPU runtimes an exported ONNX file can be served with, as plain batch runners, and their speed.

Used by the accuracy gate (metrics through the runtime that will serve the file), by `export
repository` (which measures both runtimes on the machine it runs on and serves the fastest gated
variant) and by benchmarks/bench_models.py. The sessions and compiled models come from the runtime
layer (cnncore/runtime) with the server's own defaults, so what export measures is what is served;
this module only fixes export's thread count.
"""

from __future__ import annotations

from pathlib import Path

from cnncore.runtime import (
    RUNTIMES,
    OpenVinoSettings,
    OrtSettings,
    Runner,
    RuntimeUnavailable,
    available_runtimes,
    openvino_available,
    throughput,
)
from cnncore.runtime import openvino_runner as _openvino_runner
from cnncore.runtime import ort_runner as _ort_runner
from cnncore.runtime import runner as _runner

# Not installed here: the runtime layer's error under the name export has always caught.
RuntimeMissing = RuntimeUnavailable

__all__ = [
    "RUNTIMES",
    "Runner",
    "RuntimeMissing",
    "available_runtimes",
    "openvino_available",
    "openvino_runner",
    "ort_runner",
    "runner",
    "served_runner",
    "throughput",
    "variant_runner",
]


def ort_runner(path: Path, threads: int = 2) -> Runner:
    return _ort_runner(path, OrtSettings(intra_op_threads=threads, inter_op_threads=1))


def openvino_runner(path: Path, threads: int = 2, precision_hint: str = "f32") -> Runner:
    return _openvino_runner(path, OpenVinoSettings(threads=threads, precision_hint=precision_hint))


def runner(path: Path, runtime: str, threads: int = 2) -> Runner:
    return _runner(path, runtime, threads)


def variant_runner(path: Path, precision: str, runtime: str, threads: int = 2) -> Runner:
    """A runner of one served variant: BF16 is the FP32 file on OpenVINO with INFERENCE_PRECISION_HINT
    bf16 (the config parameter export writes for it); FP32 and INT8 run as `runner` runs them."""
    if precision == "bf16":
        if runtime != "openvino":
            raise ValueError(f"bf16 is served by openvino only, not {runtime!r}")
        return openvino_runner(path, threads, "bf16")
    return runner(path, runtime, threads)


def served_runner(model_dir: Path, version: int = 1, threads: int = 2) -> Runner:
    """The variant a repository model's config.pbtxt serves, run in this process as the server runs it:
    the runtime, file and INFERENCE_PRECISION_HINT the config names, or the variant this CPU re-selects
    (cnncore/variant_select.py) (tests compare the server with it)."""
    from cnncore.config import load_config
    from cnncore.spec import META_FILENAME, ModelMeta
    from cnncore.variant_select import reselect

    cfg = load_config(model_dir)
    runtime = cfg.backend or "onnxruntime"
    path = Path(model_dir) / str(version) / (cfg.default_model_filename or "model.onnx")
    params = cfg.parameters
    hint = params["INFERENCE_PRECISION_HINT"].string_value if "INFERENCE_PRECISION_HINT" in params else ""
    # on a CPU whose flags differ from export's, the server serves another gated variant: so does this
    choice = reselect(ModelMeta.read(model_dir)) if (Path(model_dir) / META_FILENAME).is_file() else None
    if choice is not None:
        v = choice.variant
        return variant_runner(path.with_name(v.file), v.precision, v.runtime, threads)
    return variant_runner(path, "bf16" if hint == "bf16" else "fp32", runtime, threads)
