"""Engines for every model of a repository: cached ones kept, failures reported per model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cnncore.artifacts import ONNX_FILENAME
from cnncore.engine_manifest import EngineManifest, EngineMismatch, EngineRecord, select_engine, tensorrt_source
from export.tensorrt.activation import activate_tensorrt
from export.tensorrt.build import (
    Progress,
    build_engine,
    check_precision_supported,
    engine_precision,
    import_tensorrt,
    print_progress,
    qdq_onnx,
    timing_cache_path,
)
from export.tensorrt.calibration import CALIBRATION_DIRNAME, load_calibration_samples, select_calibration_files
from export.tensorrt.engine_parity import engine_parity
from export.tensorrt.errors import BuildError
from export.tensorrt.gpu import GpuInfo, probe_gpu
from export.tensorrt.profiles import profiles_from_config


def current_engine(version_dir: Path, gpu: GpuInfo, tensorrt_version: str, precision: str) -> EngineRecord | None:
    """The engine already built for this GPU, TensorRT, precision and ONNX, if any: the export service
    re-runs at every `docker compose up` and must only build what the volume does not hold yet."""
    try:
        return select_engine(version_dir, gpu.compute_capability, tensorrt_version, precision)
    except EngineMismatch:
        return None


def build_repository_engines(
    repository: Path,
    *,
    precision: str = "fp16",
    workspace_mib: int = 2048,
    models: Sequence[str] | None = None,
    calibration_samples: int = 256,
    parity: bool = True,
    skip_existing: bool = False,
    activate: bool = False,
    progress: Progress = print_progress,
) -> dict[str, EngineRecord]:
    """Build an engine for the latest version of each model in the repository; returns model -> record.

    Fails per model (the error is printed and the rest are built), then raises at the end if any failed,
    so one model TensorRT cannot parse does not cost the other engines.
    """
    from cnncore.config import load_config
    from cnncore.layout import model_names, version_numbers

    repository = Path(repository)
    trt = import_tensorrt()
    check_precision_supported(precision, trt.__version__)
    gpu = probe_gpu()
    cache = timing_cache_path(repository, gpu, trt.__version__)
    names = list(models) if models else model_names(repository)
    progress(
        f"building {precision} engines for {len(names)} model(s) on {gpu.name} (compute capability "
        f"{gpu.compute_capability}), TensorRT {trt.__version__}; timing cache {cache}"
    )
    built: dict[str, EngineRecord] = {}
    failed: dict[str, str] = {}
    for i, name in enumerate(names, 1):
        model_dir = repository / name
        try:
            config = load_config(model_dir)
            versions = [v for v in version_numbers(model_dir) if (model_dir / str(v) / ONNX_FILENAME).is_file()]
            if not versions:
                raise BuildError(f"{model_dir}: no version directory with {ONNX_FILENAME}")
            version_dir = model_dir / str(versions[-1])
            progress(f"[{i}/{len(names)}] {name} v{versions[-1]}")
            # A served INT8 model (either INT8 file) gets an INT8 engine by default, built from the
            # symmetric QDQ file; FP32 / FP16 ones are built from the FP32 parent (tensorrt_source).
            model_precision = engine_precision(version_dir / ONNX_FILENAME, precision)
            source = tensorrt_source(version_dir, model_precision)
            explicit = qdq_onnx(source)
            if explicit:
                progress(
                    f"    {source.name} is QDQ INT8 (export's INT8): explicit-quantization {model_precision} engine"
                )
            elif source.name != ONNX_FILENAME:
                progress(f"    building from {source.name} (the FP32 parent of the served {ONNX_FILENAME})")
            existing = current_engine(version_dir, gpu, trt.__version__, model_precision) if skip_existing else None
            if existing is not None:
                progress(f"    cached: {existing.file}")
                built[name] = existing
                if activate:
                    activate_tensorrt(model_dir, existing)
                continue
            profiles = profiles_from_config(config)
            calib = None
            if model_precision == "int8" and not explicit:  # implicit INT8: TensorRT's calibrator
                if len(profiles) != 1:
                    raise BuildError(
                        f"{name}: int8 calibration supports single-input models, this one has {', '.join(profiles)}"
                    )
                p = next(iter(profiles.values()))
                files = select_calibration_files(model_dir / CALIBRATION_DIRNAME, calibration_samples)
                calib = load_calibration_samples(files, model_dir, p.max[1:])
                progress(f"    calibrating on {len(calib)} samples")
            record = build_engine(
                source,
                profiles,
                precision=model_precision,
                workspace_mib=workspace_mib,
                timing_cache=cache,
                calibration=calib,
                gpu=gpu,
                progress=progress,
            )
            if parity:
                report = engine_parity(version_dir, record)
                worst = report.worst()
                progress(
                    f"    parity vs ONNX Runtime, batches {report.batch_sizes}: max abs {worst.max_abs:.3g} "
                    f"(tolerance {worst.tolerance:.3g}), max rel {worst.max_rel:.3g}"
                )
                if not report.ok:
                    raise BuildError(
                        report.failure_message().replace("PyTorch vs ONNX Runtime", "TensorRT vs ONNX Runtime")
                    )
            manifest = EngineManifest.read(version_dir)
            manifest.add(record)
            manifest.write(version_dir)
            built[name] = record
            if activate:
                activate_tensorrt(model_dir, record)
        except Exception as exc:  # reported per model, summarised below
            failed[name] = str(exc)
            progress(f"    FAILED: {exc}")
    if failed:
        raise BuildError(f"{len(failed)} engine build(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return built
