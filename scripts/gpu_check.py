"""GPU check: what this machine has, the GPU tests that can run here, and the served models driven at
several concurrencies through the GPU backend found, beside the CPU default measured in the same run.

Written for a GPU machine that has PyTorch with CUDA but may lack TensorRT, onnxruntime-gpu, even
grpcio, and cannot install anything: every step checks what it needs and says what it skipped.

    bash scripts/gpu_check.sh                # on a GPU machine (well under 8 minutes)
    bash scripts/gpu_check.sh --cpu-only     # dry run of the same steps on CPU (CI runs it --quick)

Serving path, best available first:
  server     the real server (python -m server) on loopback, driven over gRPC by the project's asyncio
             client; GPU models on backend pytorch (torch.export program on CUDA), plus tensorrt (an
             fp16 engine built here) and onnxruntime on CUDA when those exist; CPU default on ONNX
             Runtime; average executed batch size from the ModelStatistics RPC.
  in-process the torch backend called directly at fixed batch sizes (when the server's own
             dependencies are missing): no batching, no gRPC, labelled as such.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ("mobilenet_v2", "resnet18", "fashion_resnet20")
QUICK_MODELS = ("fashion_resnet20",)
GPU_TEST_FILES = ("tests/test_gpu_backends.py", "tests/test_tensorrt_engine.py", "tests/test_gpu_metrics.py")
OPTIONAL_MODULES = (
    "numpy",
    "torch",
    "tensorrt",
    "cuda.bindings",
    "pynvml",
    "onnxruntime",
    "onnx",
    "onnxscript",
    "grpc",
    "grpc_health",
    "google.protobuf",
    "prometheus_client",
    "pydantic",
    "PIL",
    "pytest",
    "tritonclient.grpc",
)


def say(msg: str = "") -> None:
    print(msg, flush=True)


# Distribution names, for versions read from package metadata: importing is avoided on purpose, since
# tritonclient's generated `inference.*` messages clash with the project's own in one process.
_DISTRIBUTIONS = {
    "cuda.bindings": "cuda-bindings",
    "pynvml": "nvidia-ml-py",
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "google.protobuf": "protobuf",
    "PIL": "pillow",
    "prometheus_client": "prometheus-client",
    "tritonclient.grpc": "tritonclient",
}


def module_version(name: str) -> str | None:
    """Installed version of a module (None when absent), without importing it."""
    from importlib import metadata, util

    try:
        if util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):  # a dotted name whose parent package is missing
        return None
    try:
        return metadata.version(_DISTRIBUTIONS.get(name, name))
    except metadata.PackageNotFoundError:
        return "present"


# ------------------------------------------------------------------ 1. what exists


def report_environment() -> dict:
    info: dict = {"python": sys.version.split()[0], "modules": {}}
    say("== environment")
    say(f"python {info['python']} ({sys.executable})")
    for name in OPTIONAL_MODULES:
        v = module_version(name)
        info["modules"][name] = v
        say(f"  {name:18s} {v or '-- missing'}")
    torch = _torch()
    info["cuda"] = bool(torch and torch.cuda.is_available())
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "torch_cuda": torch.version.cuda,
        }
        say(
            f"  GPU: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB, x{torch.cuda.device_count()}, torch CUDA {torch.version.cuda}"
        )
    else:
        say("  GPU: none visible to torch")
    if info["modules"].get("onnxruntime"):
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
        say(f"  onnxruntime providers: {', '.join(info['ort_providers'])}")
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = out.stdout.strip()
        say(f"  nvidia-smi: {out.stdout.strip() or out.stderr.strip()}")
    return info


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# ------------------------------------------------------------------ 2. GPU tests


def run_gpu_tests(timeout_s: int) -> dict[str, str]:
    say("\n== GPU tests (pytest -m 'gpu or tensorrt')")
    if not module_version("pytest"):
        say("  skipped: pytest is not installed")
        return {"all": "skipped: no pytest"}
    results = {}
    for test_file in GPU_TEST_FILES:
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-rs",
                    "-p",
                    "no:cacheprovider",
                    "-m",
                    "gpu or tensorrt",
                    test_file,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-3:]
            results[test_file] = " / ".join(tail)
        except subprocess.TimeoutExpired:
            results[test_file] = f"timed out after {timeout_s}s"
        say(f"  {test_file}: {results[test_file]}")
    return results


# ------------------------------------------------------------------ 3. a repository for the benchmark


@dataclass
class Variant:
    model: str  # registry name
    served_as: str  # repository model name
    backend: str  # onnxruntime | pytorch
    device: str  # cpu | gpu
    input_name: str
    input_shape: tuple[int, ...]  # per item, no batch
    graphs: bool = False  # optimization.cuda.graphs (torch backend on CUDA)

    @property
    def path(self) -> str:
        return f"{self.backend} {self.device}" + (" graphs" if self.graphs else "")


def _config_text(
    name: str,
    backend: str,
    kind: str,
    input_name: str,
    input_shape,
    outputs: dict[str, tuple],
    max_batch: int,
    instances: int,
    graphs: bool = False,
) -> str:
    dims = ", ".join(str(d) for d in input_shape)
    out = ",\n  ".join(
        f'{{ name: "{o}" data_type: TYPE_FP32 dims: [{", ".join(str(d) for d in s)}] }}' for o, s in outputs.items()
    )
    return (
        f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {max_batch}\n'
        f'input [{{ name: "{input_name}" data_type: TYPE_FP32 dims: [{dims}] }}]\n'
        f"output [\n  {out}\n]\n"
        f"instance_group [{{ kind: {kind} count: {instances} }}]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: 500 }}\n"
        + ("optimization { cuda { graphs: true } }\n" if graphs else "")
    )


def gpu_backends_found(info: dict) -> list[str]:
    """GPU backends this machine can serve with, besides the torch one: TensorRT (TensorRT + cuda-python +
    an ONNX exporter) and ONNX Runtime's CUDA provider."""
    found = []
    if all(info["modules"].get(m) for m in ("tensorrt", "cuda.bindings", "onnxscript")):
        found.append("tensorrt")
    if "CUDAExecutionProvider" in info.get("ort_providers", []):
        found.append("onnxruntime")
    return found


def build_repository(
    root: Path, models, gpu: bool, max_batch: int, onnx: bool = True, extra_gpu: tuple[str, ...] = ()
) -> tuple[list[Variant], list[str]]:
    """Export each model once (torch.export; ONNX for the CPU default when ONNX Runtime is here and for
    the TensorRT engine) and write one repository entry per (model, backend, device)."""
    import shutil as _shutil

    import torch

    from cnncore.artifacts import ONNX_FILENAME, PROGRAM_FILENAME
    from export.torch_program import export_program, save_program
    from models import get_entry, get_model

    have_ort = onnx and bool(module_version("onnxruntime") and module_version("onnxscript"))
    notes: list[str] = []
    variants: list[Variant] = []
    for name in models:
        entry = get_entry(name)
        try:
            model = get_model(name, weights="default" if entry.has_weights else None)
            weights = "trained" if entry.has_weights else "random init (architecture only)"
        except Exception as exc:  # no network on GPU boxes: weights may be unreachable
            model = get_model(name, weights=None)
            weights = f"random init (weights unavailable: {str(exc)[:80]})"
        notes.append(f"{name}: {weights}; timings do not depend on weight values")
        example = torch.randn(2, *entry.input_shape)
        with torch.no_grad():
            result = model(example)
        result = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        outputs = {o: tuple(t.shape[1:]) for o, t in zip(entry.output_names, result, strict=True)}
        t0 = time.perf_counter()
        program = export_program(model, example, max_batch)
        input_name = "input"
        # (backend, instance kind, device, CUDA graphs): the eager torch program and its CUDA-graph replay.
        kinds = (
            [("pytorch", "KIND_GPU", "gpu", False), ("pytorch", "KIND_GPU", "gpu", True)]
            if gpu
            else [("pytorch", "KIND_CPU", "cpu", False)]
        )
        if gpu:
            kinds += [(b, "KIND_GPU", "gpu", False) for b in extra_gpu]
        if have_ort:
            kinds.append(("onnxruntime", "KIND_CPU", "cpu", False))
        else:
            notes.append(f"{name}: CPU default measured with the torch backend (onnxruntime/onnxscript missing)")
            if gpu:
                kinds.append(("pytorch", "KIND_CPU", "cpu", False))
        onnx_file = root / ".onnx" / f"{name}.onnx"
        if any(k[0] != "pytorch" for k in kinds):
            onnx_file.parent.mkdir(parents=True, exist_ok=True)
            torch.onnx.export(
                program,
                (example,),
                str(onnx_file),
                input_names=[input_name],
                output_names=list(outputs),
                dynamo=True,
                external_data=False,
            )
        for backend, kind, device, graphs in kinds:
            served = f"{name}__{backend}_{device}" + ("_graphs" if graphs else "")
            vdir = root / served / "1"
            vdir.mkdir(parents=True)
            if backend == "pytorch":
                save_program(program, vdir / PROGRAM_FILENAME, [input_name], list(outputs))
            else:
                _shutil.copy(onnx_file, vdir / ONNX_FILENAME)
            if backend == "tensorrt":
                try:
                    _build_engine(vdir, root, input_name, entry.input_shape, max_batch)
                except Exception as exc:  # reported; the other variants still run
                    notes.append(f"{name}: TensorRT engine build failed: {exc}")
                    _shutil.rmtree(root / served)
                    continue
            (root / served / "config.pbtxt").write_text(
                _config_text(
                    served,
                    backend,
                    kind,
                    input_name,
                    entry.input_shape,
                    outputs,
                    max_batch,
                    instances=2 if device == "gpu" else 1,
                    graphs=graphs,
                )
            )
            variants.append(Variant(name, served, backend, device, input_name, tuple(entry.input_shape), graphs))
        say(f"  {name}: exported in {time.perf_counter() - t0:.1f}s ({weights})")
    return variants, notes


def _build_engine(vdir: Path, root: Path, input_name: str, input_shape, max_batch: int) -> None:
    from cnncore.artifacts import ONNX_FILENAME
    from cnncore.engine_manifest import EngineManifest
    from export.tensorrt.build import build_engine
    from export.tensorrt.profiles import derive_profile

    record = build_engine(
        vdir / ONNX_FILENAME,
        {input_name: derive_profile(input_shape, max_batch, [8])},
        precision="fp16",
        workspace_mib=2048,
        timing_cache=root / ".tensorrt" / "timing.cache",
        progress=lambda m: say(f"  {m.strip()}"),
    )
    manifest = EngineManifest()
    manifest.add(record)
    manifest.write(vdir)


# ------------------------------------------------------------------ 4. GPU utilisation sampling


class GpuSampler:
    """Mean GPU utilisation over a window, from NVML or nvidia-smi, sampled every 100 ms."""

    def __init__(self) -> None:
        self._read: Callable[[], float] | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # no pynvml / no driver
            smi = shutil.which("nvidia-smi")
            if smi:

                def read() -> float:
                    out = subprocess.run(
                        [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                        capture_output=True,
                        text=True,
                        timeout=5,
                    )
                    return float(out.stdout.strip().splitlines()[0])

                self._read = read
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._read is not None

    def __enter__(self) -> GpuSampler:
        self._samples, self._stop = [], threading.Event()
        if self._read:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        read = self._read
        assert read is not None  # started only when there is a reader
        while not self._stop.wait(0.1):
            with contextlib.suppress(Exception):  # a failed reading is skipped
                self._samples.append(read())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)

    def mean(self) -> float | None:
        return statistics.fmean(self._samples) if self._samples else None


# ------------------------------------------------------------------ 5. driving the server


@dataclass
class Row:
    model: str
    path: str  # "pytorch gpu" ...
    concurrency: int
    throughput: float  # images/s
    p50_ms: float
    p99_ms: float
    avg_batch: float | None
    gpu_util: float | None  # percent
    requests: int
    errors: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_stack_available() -> str | None:
    """None when the real server can run here, else why not."""
    for mod in ("grpc", "grpc_health", "google.protobuf", "prometheus_client", "pydantic", "numpy"):
        if not module_version(mod):
            return f"{mod} missing"
    try:
        importlib.import_module("server.app")
        importlib.import_module("client.inference")
    except Exception as exc:
        return f"server does not import: {exc}"
    return None


async def _drive(client, v: Variant, concurrency: int, seconds: float, sampler: GpuSampler) -> Row:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((1, *v.input_shape)).astype(np.float32)
    latencies: list[float] = []
    errors = 0
    stats0 = await _counts(client, v.served_as)
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                await client.infer(v.served_as, {v.input_name: x}, timeout=30)
                latencies.append(time.perf_counter() - t)
            except Exception:  # counted, reported in the table
                errors += 1

    with sampler:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    stats1 = await _counts(client, v.served_as)
    items, execs = stats1[0] - stats0[0], stats1[1] - stats0[1]
    lat = sorted(latencies) or [float("nan")]
    return Row(
        v.model,
        v.path,
        concurrency,
        len(latencies) / elapsed,
        lat[len(lat) // 2] * 1e3,
        lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
        items / execs if execs else None,
        sampler.mean() if v.device == "gpu" else None,
        len(latencies),
        errors,
    )


async def _counts(client, model: str) -> tuple[int, int]:
    stats = await client.get_inference_statistics(model)
    s = stats.model_stats[0]
    return s.inference_count, s.execution_count


async def _bench_server(grpc_port: int, variants, concurrencies, cpu_concurrencies, seconds, sampler) -> list[Row]:
    from client.inference import AsyncInferenceClient

    rows = []
    async with AsyncInferenceClient(f"127.0.0.1:{grpc_port}") as client:
        for v in variants:
            levels = concurrencies if v.device == "gpu" else cpu_concurrencies
            # Warm-up at the highest level: cuDNN autotunes per batch shape, ORT allocates its arena.
            await _drive(client, v, max(levels), min(2.0, seconds), _NullSampler())
            for c in levels:
                row = await _drive(client, v, c, seconds, sampler)
                rows.append(row)
                say(
                    f"  {row.model:18s} {row.path:16s} c={c:<3d} {row.throughput:8.1f} img/s  "
                    f"p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms"
                )
    return rows


class _NullSampler(GpuSampler):
    """Samples nothing: for warm-up runs, which are not reported."""

    def __init__(self) -> None:
        self._read = None
        self._samples = []
        self._stop = threading.Event()
        self._thread = None


def bench_with_server(repo: Path, variants, concurrencies, cpu_concurrencies, seconds, budget_end) -> list[Row]:
    grpc_port, metrics_port = _free_port(), _free_port()
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--model-repository",
        str(repo),
        "--grpc-address",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
        "--log-format",
        "text",
        "--log-level",
        "warning",
        "--allow-http",
        "false",
    ]
    with open(repo / "server.log", "w") as log:  # the server writes to its own copy of the descriptor
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        )
    try:
        try:
            _wait_ready(grpc_port, proc, variants, timeout=min(180.0, max(10.0, budget_end - time.monotonic())))
        except RuntimeError as exc:
            tail = (repo / "server.log").read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"{exc}\n  server log (last lines):\n    " + "\n    ".join(tail)) from None
        return asyncio.run(_bench_server(grpc_port, variants, concurrencies, cpu_concurrencies, seconds, GpuSampler()))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_ready(port: int, proc: subprocess.Popen, variants, timeout: float) -> None:
    from client.inference import InferenceClient

    deadline = time.monotonic() + timeout
    client = InferenceClient(f"127.0.0.1:{port}")
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if all(client.is_model_ready(v.served_as, timeout=2) for v in variants):
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.5)
    finally:
        client.close()
    raise RuntimeError(f"models not ready after {timeout:.0f}s")


def bench_in_process(repo: Path, variants, batch_sizes, seconds, sampler: GpuSampler) -> list[Row]:
    import numpy as np

    from cnncore.artifacts import PROGRAM_FILENAME
    from server.backends.base import BackendOptions
    from server.backends.torch_program import TorchProgramBackend

    rows = []
    for v in variants:
        if v.backend != "pytorch":
            continue
        backend = TorchProgramBackend(
            repo / v.served_as / "1" / PROGRAM_FILENAME,
            BackendOptions(device_kind=v.device, cuda_graphs=v.graphs, max_batch_size=max(batch_sizes)),
        )
        for n in batch_sizes:
            x = np.random.default_rng(0).standard_normal((n, *v.input_shape)).astype(np.float32)
            for _ in range(3):
                backend.execute({v.input_name: x})
            lat = []
            with sampler:
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    t = time.perf_counter()
                    backend.execute({v.input_name: x})
                    lat.append(time.perf_counter() - t)
                elapsed = time.perf_counter() - t0
            lat.sort()
            rows.append(
                Row(
                    v.model,
                    f"{v.path} (in-process, batch {n})",
                    n,
                    len(lat) * n / elapsed,
                    lat[len(lat) // 2] * 1e3,
                    lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
                    float(n),
                    sampler.mean() if v.device == "gpu" else None,
                    len(lat),
                    0,
                )
            )
        backend.close()
    return rows


# ------------------------------------------------------------------ 6. the table


def format_table(rows: list[Row]) -> str:
    head = f"| {'model':18s} | {'backend':16s} | conc | img/s    | p50 ms  | p99 ms  | avg batch | GPU util |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        batch = f"{r.avg_batch:.1f}" if r.avg_batch is not None else "-"
        util = f"{r.gpu_util:.0f}%" if r.gpu_util is not None else "-"
        lines.append(
            f"| {r.model:18s} | {r.path:16s} | {r.concurrency:4d} | {r.throughput:8.1f} | {r.p50_ms:7.2f} | "
            f"{r.p99_ms:7.2f} | {batch:>9s} | {util:>8s} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-only", action="store_true", help="dry run on CPU (no GPU needed): same steps, torch on CPU")
    ap.add_argument("--quick", action="store_true", help="one small model, short runs (CI)")
    ap.add_argument("--models", help=f"comma-separated registry names (default {','.join(DEFAULT_MODELS)})")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 5, quick 1)")
    ap.add_argument("--concurrency", default=None, help="GPU concurrency levels (default 1,8,32; quick 1,4)")
    ap.add_argument("--cpu-concurrency", default=None, help="CPU default levels (default 1,8; quick 1,4)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--no-onnx", action="store_true", help="CPU default through the torch backend, no ONNX export")
    ap.add_argument("--in-process", action="store_true", help="skip the server: call the torch backend directly")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new steps after this long")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    budget_end = time.monotonic() + args.budget_s
    quick = args.quick
    models = args.models.split(",") if args.models else list(QUICK_MODELS if quick else DEFAULT_MODELS)
    seconds = args.seconds or (1.0 if quick else 5.0)  # lowered below when more GPU backends are found
    levels = [int(c) for c in (args.concurrency or ("1,4" if quick else "1,8,32")).split(",")]
    cpu_levels = [int(c) for c in (args.cpu_concurrency or ("1,4" if quick else "1,8")).split(",")]

    info = report_environment()
    gpu = info["cuda"] and not args.cpu_only
    if gpu and not args.seconds and gpu_backends_found(info):
        seconds = 3.0  # keep the whole check well under 8 minutes with up to three GPU backends
    if not gpu and not args.cpu_only:
        say("\nno CUDA GPU visible to torch: running the CPU dry run instead (--cpu-only)")
    result: dict = {"environment": info, "mode": "gpu" if gpu else "cpu-only"}
    if info["modules"].get("torch") is None:
        say("torch is missing: nothing to serve")
        return 1
    if gpu and not args.skip_tests:
        result["tests"] = run_gpu_tests(timeout_s=150)

    torch = _torch()
    torch.set_num_threads(min(os.cpu_count() or 2, 8))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        repo = Path(tmp) / "repo"
        onnx_note = ", ONNX" if module_version("onnxruntime") and not args.no_onnx else ""
        say(f"\n== exporting {', '.join(models)} (torch.export{onnx_note})")
        extra = tuple(gpu_backends_found(info)) if gpu else ()
        if gpu:
            say(f"GPU backends: pytorch{''.join(', ' + b for b in extra)}")
        variants, notes = build_repository(repo, models, gpu=gpu, max_batch=32, onnx=not args.no_onnx, extra_gpu=extra)
        result["notes"] = notes
        why_not = "--in-process asked for" if args.in_process else server_stack_available()
        if why_not is None:
            say(f"\n== serving through the real server, {seconds:g}s per level")
            try:
                rows = bench_with_server(repo, variants, levels, cpu_levels, seconds, budget_end)
                result["serving"] = "server (gRPC, dynamic batching)"
            except RuntimeError as exc:
                # A server that cannot start here still leaves the GPU numbers worth having.
                say(f"  server failed: {exc}")
                why_not = f"server failed: {str(exc).splitlines()[0]}"
        if why_not is not None:
            say(f"\n== server stack unavailable ({why_not}): in-process torch backend at fixed batch sizes")
            rows = bench_in_process(repo, variants, [1, 8, 32] if not quick else [1, 4], seconds, GpuSampler())
            result["serving"] = f"in-process ({why_not})"
    result["rows"] = [asdict(r) for r in rows]
    say("\n== results (" + result["serving"] + ")")
    say(format_table(rows))
    for note in notes:
        say(f"  note: {note}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    failed = sum(r.errors for r in rows)
    if failed:
        say(f"{failed} request(s) failed")
    return 0 if rows and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
