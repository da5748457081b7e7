"""The CPU runtimes an exported ONNX file can be served with, as plain batch runners, and their speed.

Used by the accuracy gate (metrics through the runtime that will serve the file), by `export
repository` (which measures both runtimes on the machine it runs on and serves the fastest gated
variant) and by benchmarks/bench_models.py. Settings mirror the server's backends: ONNX Runtime with
full graph optimisation and no spinning; OpenVINO on the CPU plugin with FP32 inference precision
(this CPU has avx512_bf16, where OpenVINO would otherwise silently run FP32 models in bfloat16).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]
RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")


class RuntimeMissing(RuntimeError):
    """The runtime is not installed here."""


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def available_runtimes() -> list[str]:
    return [r for r in RUNTIMES if r != "openvino" or openvino_available()]


def ort_runner(path: Path, threads: int = 2) -> Runner:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(outputs, {name: np.ascontiguousarray(x, dtype=np.float32)})))

    return run


def openvino_runner(path: Path, threads: int = 2) -> Runner:
    return _openvino_runner(path, threads, "f32")


def _openvino_runner(path: Path, threads: int, inference_precision: str) -> Runner:
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeMissing(f"openvino is not installed ({exc}); pip install openvino") from None
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": inference_precision,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    outputs = [o.get_any_name() for o in compiled.outputs]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        res = request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return {n: np.array(res[o]) for n, o in zip(outputs, compiled.outputs)}

    return run


def runner(path: Path, runtime: str, threads: int = 2) -> Runner:
    if runtime == "onnxruntime":
        return ort_runner(path, threads)
    if runtime == "openvino":
        return openvino_runner(path, threads)
    raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")


def variant_runner(path: Path, precision: str, runtime: str, threads: int = 2) -> Runner:
    """A runner of one served variant: BF16 is the FP32 file on OpenVINO with INFERENCE_PRECISION_HINT
    bf16 (the config parameter export writes for it); FP32 and INT8 run as `runner` runs them."""
    if precision == "bf16":
        if runtime != "openvino":
            raise ValueError(f"bf16 is served by openvino only, not {runtime!r}")
        return _openvino_runner(path, threads, "bf16")
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
    hint = cfg.parameters["INFERENCE_PRECISION_HINT"].string_value if "INFERENCE_PRECISION_HINT" in cfg.parameters else ""
    # on a CPU whose flags differ from export's, the server serves another gated variant: so does this
    choice = reselect(ModelMeta.read(model_dir)) if (Path(model_dir) / META_FILENAME).is_file() else None
    if choice is not None:
        v = choice.variant
        return variant_runner(path.with_name(v.file), v.precision, v.runtime, threads)
    return variant_runner(path, "bf16" if hint == "bf16" else "fp32", runtime, threads)


def throughput(run: Runner, sample: np.ndarray, batch: int, seconds: float = 0.5, warmup: bool = True,
               min_runs: int = 2) -> float:
    """Images per second of `run` on `batch` copies of `sample` [C,H,W] (after one warm-up run)."""
    x = np.ascontiguousarray(np.repeat(sample[None], batch, axis=0), dtype=np.float32)
    if warmup:
        run(x)
    n, t0 = 0, time.perf_counter()
    while True:
        run(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= min_runs:
            return n * batch / elapsed
