"""Build TensorRT engines from the repository's ONNX models, for the GPU this runs on.

    python -m export.tensorrt_engine --repository DIR [--precision fp16|fp32|int8] [--workspace-mib N]

Per model: parse `<version>/model.onnx` with TensorRT's ONNX parser, add one optimization profile
derived from config.pbtxt (batch min 1, opt at the preferred batch, max at max_batch_size), build with
a timing cache shared by all builds on this GPU + TensorRT (later builds skip kernel timing they already
did), write `model.<sm>.trt<ver>.<precision>.plan` and record it in `engines.json`
(export/engine_manifest.py), then check the engine against ONNX Runtime on the same inputs.

TensorRT, cuda-python and a GPU are imported/probed lazily: everything up to the build itself (profile
derivation, calibration sample selection, naming) is plain Python and tested on CPU machines.

TensorRT 11 removed the weak-typing precision flags (BuilderFlag.FP16/INT8 and the INT8 calibrators):
there fp16/int8 mean converting the ONNX first (ModelOpt AutoCast / Q-DQ), so this builder refuses them
with that advice instead of failing inside TensorRT.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cnncore.engine_manifest import (
    PRECISIONS,
    EngineManifest,
    EngineRecord,
    ProfileShapes,
    engine_filename,
    file_sha256,
)

ONNX_FILENAME = "model.onnx"
CALIBRATION_DIRNAME = "calibration"  # <repo>/<model>/calibration/: images or .npy the model really sees
TIMING_CACHE_DIRNAME = ".tensorrt"  # <repo>/.tensorrt/timing.<sm>.trt<ver>.cache
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Parity (atol, rtol) against ONNX Runtime FP32 by engine precision, in export/parity.py's criterion
# max|d| <= atol + rtol * max|ref|. INT8 is reported, not enforced: its error depends on calibration.
PARITY_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (1e-3, 2e-2), "int8": (float("inf"), 0.0)}

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """The engine could not be built; the message says which model and why."""


def _print_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- profile derivation (CPU-testable)

def derive_profile(
    dims: Sequence[int], max_batch_size: int, preferred_batch_sizes: Sequence[int] = ()
) -> ProfileShapes:
    """Optimization-profile shapes for one input from its config.pbtxt entry.

    dims: the per-request dims from config.pbtxt (no batch dimension when max_batch_size > 0).
    The batch range is [1, max_batch_size]; TensorRT tunes kernels for `opt`, so opt is the batch the
    dynamic batcher aims for: the largest preferred batch size within range, else max_batch_size
    (a saturated batcher executes full batches).
    """
    dims = tuple(int(d) for d in dims)
    if any(d <= 0 for d in dims):
        raise BuildError(f"input dims {list(dims)} have a variable (-1) or empty dimension besides the batch: "
                         "a TensorRT profile needs fixed sizes; export the model at a fixed input size")
    if max_batch_size < 0:
        raise BuildError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if max_batch_size == 0:  # Triton: no batching, dims are the full shape
        return ProfileShapes(min=dims, opt=dims, max=dims)
    preferred = [int(b) for b in preferred_batch_sizes if 1 <= int(b) <= max_batch_size]
    opt = max(preferred) if preferred else max_batch_size
    return ProfileShapes(min=(1, *dims), opt=(opt, *dims), max=(max_batch_size, *dims))


def profiles_from_config(config) -> dict[str, ProfileShapes]:  # config: protos.model_config_pb2.ModelConfig
    preferred = list(config.dynamic_batching.preferred_batch_size) if config.HasField("dynamic_batching") else []
    return {inp.name: derive_profile(inp.dims, config.max_batch_size, preferred) for inp in config.input}


# ---------------------------------------------------------------- calibration data (CPU-testable)

def select_calibration_files(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """A deterministic, seed-chosen subset of the calibration samples in `directory`.

    Sorted first so the choice does not depend on directory order; sampled (not the first N) so a
    directory written class by class still gives a mixed set, which INT8 ranges depend on.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BuildError(f"INT8 calibration needs sample inputs in {directory} (images or .npy); none found")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"))
    if not files:
        raise BuildError(f"{directory}: no calibration samples (expected {', '.join(IMAGE_SUFFIXES)} or .npy files)")
    if count <= 0 or count >= len(files):
        return files
    return sorted(random.Random(seed).sample(files, count))


def load_calibration_samples(files: Sequence[Path], model_dir: Path, shape: Sequence[int]) -> np.ndarray:
    """Stack samples into an NCHW float32 array of per-sample `shape` (CHW).

    Images go through the model's own stored preprocessing (cnncore/preprocess.py, the one
    implementation the server uses), so calibration sees exactly what serving feeds the engine.
    """
    from PIL import Image

    from cnncore.preprocess import preprocess
    from cnncore.spec import ModelMeta

    shape = tuple(int(s) for s in shape)
    spec = None
    samples: list[np.ndarray] = []
    for path in files:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False).astype(np.float32)
            arr = arr.reshape(-1, *shape) if arr.size % int(np.prod(shape)) == 0 else None
            if arr is None:
                raise BuildError(f"{path}: array does not hold samples of shape {list(shape)}")
            samples.extend(arr)
            continue
        if spec is None:
            spec = ModelMeta.read(model_dir).preprocess
        with Image.open(path) as img:
            arr, _ = preprocess(img, spec)
        if arr.shape != shape:
            raise BuildError(f"{path}: preprocessed to {list(arr.shape)}, the model input is {list(shape)}")
        samples.append(arr)
    return np.ascontiguousarray(np.stack(samples).astype(np.float32))


def calibration_batches(samples: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Full batches only: the calibration profile has one batch size, so a short tail is dropped."""
    for start in range(0, len(samples) - batch_size + 1, batch_size):
        yield np.ascontiguousarray(samples[start:start + batch_size])


# ---------------------------------------------------------------- the TensorRT build (GPU only)

@dataclass(frozen=True)
class GpuInfo:
    compute_capability: str  # "8.6"
    name: str


def probe_gpu(device_id: int = 0) -> GpuInfo:
    """Compute capability of the GPU the engine is built for, from cuda-python (what the engine code
    uses) or NVML; BuildError when neither sees a GPU."""
    try:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(device_id)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return GpuInfo(f"{props.major}.{props.minor}", name.rstrip("\x00"))
    except ImportError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            return GpuInfo(f"{major}.{minor}", str(pynvml.nvmlDeviceGetName(handle)))
        finally:
            pynvml.nvmlShutdown()
    except (ImportError, Exception) as exc:  # pynvml raises NVMLError subclasses when no driver
        raise BuildError(f"no CUDA GPU found to build for (cuda-python / NVML: {exc})") from None


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(f"TensorRT is not installed ({exc}); build engines in the export image "
                         "(deploy/Dockerfile.export) or `pip install tensorrt` on a GPU machine") from None
    return trt


def tensorrt_major(version: str) -> int:
    return int(version.split(".")[0])


def check_precision_supported(precision: str, tensorrt_version: str) -> None:
    if precision not in PRECISIONS:
        raise BuildError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "fp32" and tensorrt_major(tensorrt_version) >= 11:
        raise BuildError(f"TensorRT {tensorrt_version} removed weak-typing precision flags: for {precision}, "
                         "convert the ONNX first (ModelOpt AutoCast for fp16, Q/DQ nodes for int8) and build "
                         "that with --precision fp32, or use TensorRT 10")


def timing_cache_path(repository: Path, gpu: GpuInfo, tensorrt_version: str) -> Path:
    from cnncore.engine_manifest import capability_tag

    return Path(repository) / TIMING_CACHE_DIRNAME / f"timing.{capability_tag(gpu.compute_capability)}.trt{tensorrt_version}.cache"


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


def _make_calibrator(trt, batches: list[np.ndarray], input_name: str, cache_file: Path):
    from cnncore.trt_runtime import DeviceBuffer

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds the selected samples batch by batch from one device buffer; the resulting scale cache
        is kept next to the engine so a rebuild (e.g. new TensorRT) skips re-calibration."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = batches
            self._index = 0
            self._device = DeviceBuffer(batches[0].nbytes)

        def get_batch_size(self):
            return self._batches[0].shape[0]

        def get_batch(self, names):
            if self._index >= len(self._batches):
                return None
            self._device.copy_from_host(self._batches[self._index])
            self._index += 1
            return [self._device.ptr]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            cache_file.write_bytes(bytes(cache))

    return _EntropyCalibrator()


def build_engine(
    onnx_path: Path,
    profiles: dict[str, ProfileShapes],
    *,
    precision: str = "fp16",
    workspace_mib: int = 2048,
    timing_cache: Path | None = None,
    calibration: np.ndarray | None = None,
    gpu: GpuInfo | None = None,
    progress: Progress = _print_progress,
) -> EngineRecord:
    """Build one engine next to `onnx_path` and return its manifest record (not yet written)."""
    trt = import_tensorrt()
    check_precision_supported(precision, trt.__version__)
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

    if precision == "fp16":
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
        calibrator = _make_calibrator(trt, list(calibration_batches(calibration, batch)), input_name,
                                      onnx_path.parent / f"calibration.{gpu.compute_capability}.cache")
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
        file=out_name, compute_capability=gpu.compute_capability, tensorrt_version=trt.__version__,
        precision=precision, gpu_name=gpu.name, onnx_sha256=file_sha256(onnx_path), profiles=profiles,
        workspace_mib=workspace_mib)


def parity_against_onnxruntime(backend, onnx_path: Path, batch_sizes: Sequence[int], atol: float, rtol: float,
                               label: str, seed: int = 0):
    """Any backend against ONNX Runtime (CPU, FP32) on the same random inputs, as the ONNX export's own
    parity report (export/parity.py: scale-aware max |d| <= atol + rtol * max |ref|, per output and
    batch size)."""
    import onnxruntime as ort

    from export.parity import ParityReport, _compare

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    results = []
    for n in batch_sizes:
        feeds = {spec.name: rng.standard_normal((n, *spec.shape)).astype(spec.dtype) for spec in backend.inputs}
        got = backend.execute(feeds)
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        results.extend(_compare(ref, got[name], atol, rtol, n, name) for name, ref in want.items())
    return ParityReport(label, list(batch_sizes), atol, rtol, results, custom_check=False)


def engine_parity(version_dir: Path, record: EngineRecord, batch_sizes: Sequence[int] | None = None):
    """The engine against ONNX Runtime, with tolerances by engine precision."""
    from cnncore.trt_runtime import EngineRunner
    from export.parity import default_batch_sizes

    atol, rtol = PARITY_TOLERANCE[record.precision]
    engine = EngineRunner(Path(version_dir) / record.file)
    try:
        return parity_against_onnxruntime(
            engine, Path(version_dir) / ONNX_FILENAME, list(batch_sizes or default_batch_sizes(record.max_batch or 1)),
            atol, rtol, f"{Path(version_dir).parent.name} ({record.precision} engine)")
    finally:
        engine.close()


def current_engine(version_dir: Path, gpu: GpuInfo, tensorrt_version: str, precision: str) -> EngineRecord | None:
    """The engine already built for this GPU, TensorRT, precision and ONNX, if any: the export service
    re-runs at every `docker compose up` and must only build what the volume does not hold yet."""
    from cnncore.engine_manifest import EngineMismatch, select_engine

    try:
        return select_engine(version_dir, gpu.compute_capability, tensorrt_version, precision)
    except EngineMismatch:
        return None


def activate_tensorrt(model_dir: Path, record: EngineRecord | None = None) -> Path:
    """Point a model's config.pbtxt at its TensorRT engines: backend tensorrt on KIND_GPU instances
    (instance counts kept), no default_model_filename so engines.json picks the file per GPU. The
    record's engine is also listed in Triton's own per-GPU map, cc_model_filenames, so Triton itself can
    serve the same repository."""
    from cnncore.config import load_config, retarget_to_gpu, write_config

    config = retarget_to_gpu(load_config(model_dir), "tensorrt")
    if record is not None:
        config.cc_model_filenames[record.compute_capability] = record.file
    return write_config(config, model_dir)


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
    progress: Progress = _print_progress,
) -> dict[str, EngineRecord]:
    """Build an engine for the latest version of each model in the repository; returns model -> record.

    Fails per model (the error is printed and the rest are built), then raises at the end if any failed,
    so one model TensorRT cannot parse does not cost the other engines.
    """
    from cnncore.config import load_config
    from cnncore.layout import version_numbers

    repository = Path(repository)
    trt = import_tensorrt()
    check_precision_supported(precision, trt.__version__)
    gpu = probe_gpu()
    cache = timing_cache_path(repository, gpu, trt.__version__)
    names = list(models) if models else sorted(p.name for p in repository.iterdir()
                                                if (p / "config.pbtxt").is_file())
    progress(f"building {precision} engines for {len(names)} model(s) on {gpu.name} (compute capability "
             f"{gpu.compute_capability}), TensorRT {trt.__version__}; timing cache {cache}")
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
            existing = current_engine(version_dir, gpu, trt.__version__, precision) if skip_existing else None
            if existing is not None:
                progress(f"    cached: {existing.file}")
                built[name] = existing
                if activate:
                    activate_tensorrt(model_dir, existing)
                continue
            profiles = profiles_from_config(config)
            calib = None
            if precision == "int8":
                if len(profiles) != 1:
                    raise BuildError(f"{name}: int8 calibration supports single-input models, this one has "
                                     f"{', '.join(profiles)}")
                p = next(iter(profiles.values()))
                files = select_calibration_files(model_dir / CALIBRATION_DIRNAME, calibration_samples)
                calib = load_calibration_samples(files, model_dir, p.max[1:])
                progress(f"    calibrating on {len(calib)} samples")
            record = build_engine(version_dir / ONNX_FILENAME, profiles, precision=precision,
                                  workspace_mib=workspace_mib, timing_cache=cache, calibration=calib,
                                  gpu=gpu, progress=progress)
            if parity:
                report = engine_parity(version_dir, record)
                worst = report.worst()
                progress(f"    parity vs ONNX Runtime, batches {report.batch_sizes}: max abs {worst.max_abs:.3g} "
                         f"(tolerance {worst.tolerance:.3g}), max rel {worst.max_rel:.3g}")
                if not report.ok:
                    raise BuildError(report.failure_message().replace("PyTorch vs ONNX Runtime",
                                                                      "TensorRT vs ONNX Runtime"))
            manifest = EngineManifest.read(version_dir)
            manifest.add(record)
            manifest.write(version_dir)
            built[name] = record
            if activate:
                activate_tensorrt(model_dir, record)
        except Exception as exc:  # noqa: BLE001 - reported per model, summarised below
            failed[name] = str(exc)
            progress(f"    FAILED: {exc}")
    if failed:
        raise BuildError(f"{len(failed)} engine build(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return built


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.tensorrt_engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", required=True, type=Path, help="model repository written by export.py")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp16")
    ap.add_argument("--workspace-mib", type=int, default=2048, help="TensorRT workspace memory pool limit")
    ap.add_argument("--models", nargs="*", help="only these models (default: all in the repository)")
    ap.add_argument("--calibration-samples", type=int, default=256, help="int8: samples from <model>/calibration/")
    ap.add_argument("--skip-parity", action="store_true", help="do not compare engines against ONNX Runtime")
    ap.add_argument("--skip-existing", action="store_true",
                    help="keep engines already built for this GPU, TensorRT, precision and ONNX (a cache)")
    ap.add_argument("--activate", action="store_true",
                    help="switch each built model's config.pbtxt to backend tensorrt on KIND_GPU")
    args = ap.parse_args(argv)
    try:
        built = build_repository_engines(args.repository, precision=args.precision, workspace_mib=args.workspace_mib,
                                         models=args.models, calibration_samples=args.calibration_samples,
                                         parity=not args.skip_parity, skip_existing=args.skip_existing,
                                         activate=args.activate)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, rec in built.items():
        print(f"{name}: {rec.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
