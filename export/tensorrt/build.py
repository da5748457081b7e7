"""One engine build: TensorRT's availability and precision rules, the shared timing cache, the build.

TensorRT 11 removed the weak-typing precision flags (BuilderFlag.FP16/INT8 and the INT8 calibrators):
there fp16/int8 mean converting the ONNX first (ModelOpt AutoCast / Q-DQ), so this builder refuses them
with that advice instead of failing inside TensorRT.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cnncore.artifacts import file_sha256
from cnncore.engine_manifest import PRECISIONS, EngineRecord, Precision, ProfileShapes, engine_filename, is_precision
from export.tensorrt.calibration import calibration_batches, make_calibrator
from export.tensorrt.errors import BuildError
from export.tensorrt.gpu import GpuInfo, probe_gpu

TIMING_CACHE_DIRNAME = ".tensorrt"  # <repo>/.tensorrt/timing.<sm>.trt<ver>.cache

Progress = Callable[[str], None]


def print_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(
            f"TensorRT is not installed ({exc}); build engines in the export image "
            "(deploy/export.Dockerfile, target gpu) or `pip install tensorrt` on a GPU machine"
        ) from None
    return trt


def tensorrt_major(version: str) -> int:
    return int(version.split(".")[0])


def check_precision_supported(precision: str, tensorrt_version: str) -> Precision:
    """`precision` as the manifest's type, when `tensorrt_version` can build it; else BuildError."""
    if not is_precision(precision):
        raise BuildError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "fp32" and tensorrt_major(tensorrt_version) >= 11:
        raise BuildError(
            f"TensorRT {tensorrt_version} removed weak-typing precision flags: for {precision}, "
            "convert the ONNX first (ModelOpt AutoCast for fp16, Q/DQ nodes for int8) and build "
            "that with --precision fp32, or use TensorRT 10"
        )
    return precision


def _has_qdq(network, trt) -> bool:
    """True when the parsed network carries Q/DQ layers (explicit quantization)."""
    kinds = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def qdq_onnx(onnx_path: Path) -> bool:
    """True when the ONNX file carries QuantizeLinear/DequantizeLinear nodes (explicit quantization)."""
    import onnx

    from export.quantize import is_qdq

    return is_qdq(onnx.load(str(onnx_path), load_external_data=False))


def engine_precision(onnx_path: Path, requested: str) -> str:
    """The precision to build `onnx_path` at: a QDQ INT8 graph asked for the default fp16 becomes an
    explicit-quantization int8 engine (TensorRT 10's recommended INT8 path); anything else as asked."""
    return "int8" if requested == "fp16" and qdq_onnx(onnx_path) else requested


def timing_cache_path(repository: Path, gpu: GpuInfo, tensorrt_version: str) -> Path:
    from cnncore.engine_manifest import capability_tag

    return (
        Path(repository)
        / TIMING_CACHE_DIRNAME
        / f"timing.{capability_tag(gpu.compute_capability)}.trt{tensorrt_version}.cache"
    )


def _make_progress_monitor(trt, progress: Progress):
    class _Monitor(trt.IProgressMonitor):
        """Prints TensorRT's top-level build phases; nested phases are too chatty for a CLI."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._steps[phase_name] = num_steps
            if parent_phase is None:
                progress(f"    {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self._steps.pop(phase_name, None)

    return _Monitor()


def build_engine(
    onnx_path: Path,
    profiles: dict[str, ProfileShapes],
    *,
    precision: str = "fp16",
    workspace_mib: int = 2048,
    timing_cache: Path | None = None,
    calibration: np.ndarray | None = None,
    gpu: GpuInfo | None = None,
    progress: Progress = print_progress,
) -> EngineRecord:
    """Build one engine next to `onnx_path` and return its manifest record (not yet written)."""
    trt = import_tensorrt()
    record_precision = check_precision_supported(precision, trt.__version__)
    gpu = gpu or probe_gpu()
    onnx_path = Path(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    # `monitor` stays referenced until the function returns: TensorRT requires the monitor to outlive
    # every object using it and does not keep the Python object alive itself.
    config.progress_monitor = monitor = _make_progress_monitor(trt, progress)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profiles:
            raise BuildError(f"{onnx_path}: graph input {name!r} is not in config.pbtxt ({', '.join(profiles)})")
        p = profiles[name]
        profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)

    explicit = _has_qdq(network, trt)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8" and explicit:
        # Explicit quantization (the QDQ INT8 file `python -m export` serves): the scales are in the
        # graph, so no calibrator; FP16 lets the layers between Q/DQ pairs run in half precision.
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        if calibration is None or len(calibration) == 0:
            raise BuildError("int8 needs calibration samples (see --calibration-samples)")
        # FP16 too: layers INT8 cannot run fall back to FP16 instead of FP32.
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
        input_name = network.get_input(0).name
        batch = min(8, len(calibration), profiles[input_name].max[0])
        config.set_calibration_profile(profile)
        # Held in a local as well: TensorRT keeps only a raw pointer to Python-implemented interfaces.
        calibrator = make_calibrator(
            trt,
            list(calibration_batches(calibration, batch)),
            input_name,
            onnx_path.parent / f"calibration.{gpu.compute_capability}.cache",
        )
        config.int8_calibrator = calibrator

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{onnx_path}: TensorRT build failed (see the TensorRT log above)")
    out_name = engine_filename(gpu.compute_capability, trt.__version__, precision)
    out_path = onnx_path.parent / out_name
    tmp = out_path.with_suffix(".plan.tmp")
    tmp.write_bytes(memoryview(serialized))
    tmp.replace(out_path)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    progress(f"    built {out_name} in {time.perf_counter() - start:.1f}s ({out_path.stat().st_size / 2**20:.1f} MiB)")
    del config, monitor  # the config (holding the monitor's pointer) goes first
    return EngineRecord(
        file=out_name,
        compute_capability=gpu.compute_capability,
        tensorrt_version=trt.__version__,
        precision=record_precision,
        gpu_name=gpu.name,
        onnx_file=onnx_path.name,
        onnx_sha256=file_sha256(onnx_path),
        profiles=profiles,
        workspace_mib=workspace_mib,
    )
