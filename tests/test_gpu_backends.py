"""GPU backends through the server's real loader: which backend a config.pbtxt asks for, a clear
refusal (that model only) where the machine lacks it, and the torch.export backend's parity with ONNX
Runtime (on CPU here; on CUDA where there is a GPU)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cnncore.artifacts import PROGRAM_FILENAME, file_sha256
from cnncore.engine_manifest import EngineManifest, EngineRecord, ProfileShapes, engine_filename
from export.torch_program import export_program, save_program
from server.backends.base import BackendOptions, BackendUnavailable, available_backends, create_backend
from server.backends.torch_program import load_program
from server.repository import LoadError, ModelRepository, RuntimeDefaults, build_model

HAVE_CUDA = torch.cuda.is_available()
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
ORT_PROVIDERS = ort.get_available_providers()

IO = """
max_batch_size: 8
input [{ name: "input" data_type: TYPE_FP32 dims: [3, 16, 16] }]
output [{ name: "logits" data_type: TYPE_FP32 dims: [5] }]
"""

# name -> config body (besides name and IO): one per way a config picks a backend.
CONFIGS = {
    "ort_cpu": 'backend: "onnxruntime"\ninstance_group [{ kind: KIND_CPU count: 1 }]',
    "torch_cpu": 'backend: "pytorch"\ninstance_group [{ kind: KIND_CPU count: 1 }]',
    "torch_platform_cpu": 'platform: "pytorch_libtorch"\ninstance_group [{ kind: KIND_CPU }]',
    "torch_gpu": 'backend: "pytorch"\ninstance_group [{ kind: KIND_GPU gpus: [0] }]',
    "torch_cpu_graphs": (
        'backend: "pytorch"\ninstance_group [{ kind: KIND_CPU }]\noptimization { cuda { graphs: true } }'
    ),
    "torch_gpu_graphs": (
        'backend: "pytorch"\ninstance_group [{ kind: KIND_GPU }]\noptimization { cuda { graphs: true } }'
    ),
    "engine": 'platform: "tensorrt_plan"\ninstance_group [{ kind: KIND_GPU }]',
    "engine_other_gpu": 'backend: "tensorrt"\ninstance_group [{ kind: KIND_GPU }]',
    "ort_trt_ep": (
        'backend: "onnxruntime"\noptimization { execution_accelerators { gpu_execution_accelerator [{\n'
        '  name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } }] } }\n'
        "instance_group [{ kind: KIND_GPU }]"
    ),
    "ort_cuda": 'platform: "onnxruntime_onnx"\ninstance_group [{ kind: KIND_GPU }]',
}


@pytest.fixture(scope="module")
def repo(exported, tmp_path_factory) -> Path:
    vdir, _, _ = exported
    root = tmp_path_factory.mktemp("gpu_repo")
    for name, body in CONFIGS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\n{body}\n{IO}')
        for f in ("model.onnx", PROGRAM_FILENAME):
            shutil.copy(vdir / f, root / name / "1" / f)
    # An engine recorded for a GPU nobody here has: the loader must refuse it by name, not crash.
    other = root / "engine_other_gpu" / "1"
    fname = engine_filename("5.0", "10.0.0", "fp16")
    (other / fname).write_bytes(b"not for this machine")
    m = EngineManifest()
    m.add(
        EngineRecord(
            file=fname,
            compute_capability="5.0",
            tensorrt_version="10.0.0",
            precision="fp16",
            onnx_sha256=file_sha256(other / "model.onnx"),
            profiles={"input": ProfileShapes(min=(1, 3, 16, 16), opt=(8, 3, 16, 16), max=(8, 3, 16, 16))},
        )
    )
    m.write(other)
    return root


def _load_error(model_dir: Path) -> str:
    with pytest.raises(LoadError) as exc:
        build_model(model_dir, RuntimeDefaults())
    return str(exc.value)


def test_backends_are_registered():
    assert {"onnxruntime", "tensorrt", "pytorch"} <= set(available_backends())


@pytest.mark.parametrize("name", ["torch_cpu", "torch_platform_cpu"])
def test_pytorch_backend_selected_by_backend_or_platform(repo, name):
    (built,) = build_model(repo / name, RuntimeDefaults())
    assert built.instances[0].kind == "pytorch" and built.instances[0].device == "cpu"
    for inst in built.instances:
        inst.close()


def test_cuda_graph_batch_sizes():
    from server.backends.torch_program import graph_batch_sizes

    assert graph_batch_sizes(1) == [1] and graph_batch_sizes(8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert graph_batch_sizes(64) == list(range(1, 65))
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]  # every batch fits the next size up


@pytest.mark.skipif(HAVE_CUDA, reason="checks the CPU fallback")
def test_cuda_graphs_on_a_cpu_instance_run_eagerly_with_a_warning(repo, exported, caplog):
    _, _, session = exported
    with caplog.at_level("WARNING", logger="cnnserve.backends.pytorch"):
        (built,) = build_model(repo / "torch_cpu_graphs", RuntimeDefaults())
    backend = built.instances[0]
    assert backend.options.cuda_graphs and backend.options.max_batch_size == 8
    assert backend.cuda_graph_sizes == []
    assert "optimization.cuda.graphs ignored" in caplog.text and "CPU" in caplog.text
    x = np.random.default_rng(3).standard_normal((3, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        backend.execute({"input": x})["logits"], session.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5
    )
    for inst in built.instances:
        inst.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA GPU visible to torch")
def test_cuda_graphs_replay_every_batch_size_with_onnx_runtime_parity(repo, exported):
    _, _, session = exported
    (built,) = build_model(repo / "torch_gpu_graphs", RuntimeDefaults())
    backend = built.instances[0]
    assert backend.device == "cuda:0" and backend.cuda_graph_sizes == list(range(1, 9))
    rng = np.random.default_rng(4)
    held = []
    for n in (8, 1, 3, 8, 5, 2):  # sizes out of order, a size twice: each replay reads its own inputs
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        got = backend.execute({"input": x})["logits"]
        assert got.shape == (n, 5)
        np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-2, atol=1e-2)
        held.append((x, got.copy(), got))
    for _x, copy, got in held:  # returned arrays are the caller's: later replays never overwrite them
        np.testing.assert_array_equal(got, copy)
    for inst in built.instances:
        inst.close()


def test_activate_pytorch_points_an_onnx_config_at_the_program_on_the_gpu(repo, tmp_path):
    from cnncore.config import load_config
    from export.torch_program import activate_pytorch

    model_dir = tmp_path / "ort_cpu"
    shutil.copytree(repo / "ort_cpu", model_dir)
    activate_pytorch(model_dir, cuda_graphs=True)
    cfg = load_config(model_dir)
    assert cfg.backend == "pytorch" and cfg.platform == "" and cfg.optimization.cuda.graphs
    assert [g.kind for g in cfg.instance_group] == [1] and cfg.max_batch_size == 8  # KIND_GPU, batching kept
    if HAVE_CUDA:
        (built,) = build_model(model_dir, RuntimeDefaults())
        assert built.instances[0].cuda_graph_sizes == list(range(1, 9))
        for inst in built.instances:
            inst.close()
    else:
        assert "sees no CUDA device" in _load_error(model_dir)


@pytest.mark.skipif(HAVE_TRT, reason="checks the refusal on machines without TensorRT")
def test_tensorrt_plan_without_tensorrt_is_refused_clearly(repo):
    msg = _load_error(repo / "engine")
    assert "'engine'" in msg and "needs TensorRT, which is not installed" in msg


@pytest.mark.skipif(not HAVE_TRT or not HAVE_CUDA, reason="needs TensorRT and a GPU to get past the import")
def test_engine_for_another_gpu_is_refused_clearly(repo):
    msg = _load_error(repo / "engine_other_gpu")
    assert "no TensorRT engine for this GPU" in msg and "5.0" in msg


@pytest.mark.skipif("TensorrtExecutionProvider" in ORT_PROVIDERS, reason="this onnxruntime has the TensorRT EP")
def test_ort_tensorrt_accelerator_on_cpu_onnxruntime_is_refused_not_silently_cpu(repo):
    msg = _load_error(repo / "ort_trt_ep")
    assert "TensorrtExecutionProvider" in msg and "onnxruntime-gpu" in msg


@pytest.mark.skipif("CUDAExecutionProvider" in ORT_PROVIDERS, reason="this onnxruntime has the CUDA EP")
def test_ort_gpu_instance_group_on_cpu_onnxruntime_is_refused(repo):
    assert "CUDAExecutionProvider" in _load_error(repo / "ort_cuda")


@pytest.mark.skipif(HAVE_CUDA, reason="checks the refusal on machines without CUDA")
def test_pytorch_on_gpu_without_cuda_is_refused(repo):
    assert "sees no CUDA device" in _load_error(repo / "torch_gpu")


def test_torch_backend_missing_program_is_refused(tmp_path):
    with pytest.raises(BackendUnavailable, match="no exported program"):
        create_backend("pytorch", tmp_path / PROGRAM_FILENAME, BackendOptions(device_kind="cpu"))


def test_models_the_machine_cannot_run_fail_alone(repo):
    """The whole repository through ModelRepository, as the server loads it at start."""

    async def go():
        repository = ModelRepository(repo)
        await repository.load_all()
        try:
            states = {n: (s.state, s.reason) for n, s in repository.models.items()}
            served = repository.get("torch_cpu")
            x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
            out = served.instances[0].execute({"input": x})
            return states, out
        finally:
            await repository.close()

    states, out = asyncio.run(go())
    assert states["ort_cpu"][0] == "READY" and states["torch_cpu"][0] == "READY"
    if not HAVE_TRT:
        assert states["engine"][0] == "UNAVAILABLE" and "TensorRT" in states["engine"][1]
    if not HAVE_CUDA:
        assert states["torch_gpu"][0] == "UNAVAILABLE"
    assert out["logits"].shape == (2, 5)


# ------------------------------------------------------------------ torch.export program vs ONNX Runtime


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so folding differences would show
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    vdir = tmp_path_factory.mktemp("repo") / "1"
    vdir.mkdir()
    program = export_program(model, torch.randn(2, 3, 16, 16), max_batch_size=8)
    save_program(program, vdir / PROGRAM_FILENAME, ["input"], ["logits"])
    torch.onnx.export(
        program,
        (torch.randn(2, 3, 16, 16),),
        str(vdir / "model.onnx"),
        input_names=["input"],
        output_names=["logits"],
        dynamo=True,
        external_data=False,
    )
    return vdir, model, ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])


def test_program_archive_carries_tensor_names(exported):
    vdir, _, _ = exported
    _, inputs, outputs = load_program(vdir / PROGRAM_FILENAME)
    assert inputs == ["input"] and outputs == ["logits"]


def test_torch_backend_on_cpu_matches_onnx_runtime(exported):
    vdir, model, session = exported
    backend = create_backend("pytorch", vdir / PROGRAM_FILENAME, BackendOptions(device_kind="cpu"))
    assert [(s.name, s.dtype, s.shape) for s in backend.inputs] == [("input", np.dtype(np.float32), (3, 16, 16))]
    assert [(s.name, s.shape) for s in backend.outputs] == [("logits", (5,))]
    rng = np.random.default_rng(1)
    for n in (1, 3, 8):
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        got = backend.execute({"input": x})["logits"]
        want = session.run(None, {"input": x})[0]
        assert got.shape == (n, 5)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    backend.close()


def test_backend_parity_report_is_the_onnx_export_report(exported):
    """The engine parity check's comparison, run here with the torch backend in the engine's place."""
    from export.eager_parity import ParityReport
    from export.tensorrt.engine_parity import parity_against_onnxruntime

    vdir, _, _ = exported
    backend = create_backend("pytorch", vdir / PROGRAM_FILENAME, BackendOptions(device_kind="cpu"))
    report = parity_against_onnxruntime(backend, vdir / "model.onnx", [1, 3, 8], 1e-4, 1e-3, "tiny")
    assert isinstance(report, ParityReport) and report.ok, report.failure_message()
    assert sorted({(r.batch_size, r.output) for r in report.results}) == [(1, "logits"), (3, "logits"), (8, "logits")]
    strict = parity_against_onnxruntime(backend, vdir / "model.onnx", [8], 0.0, 0.0, "tiny")
    assert strict.ok == (strict.worst().max_abs == 0.0)  # zero tolerance passes only bit-identical outputs
    backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA GPU visible to torch")
def test_torch_backend_on_cuda_matches_onnx_runtime(exported):
    vdir, _, session = exported
    backend = create_backend("pytorch", vdir / PROGRAM_FILENAME, BackendOptions(device_kind="gpu"))
    assert backend.device == "cuda:0"
    x = np.random.default_rng(2).standard_normal((8, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        backend.execute({"input": x})["logits"], session.run(None, {"input": x})[0], rtol=1e-2, atol=1e-2
    )  # TF32 convolutions on Ampere+ are allowed to differ a little
    backend.close()


# ------------------------------------------------------------------ scripts/gpu_check.sh, CPU dry run


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_serves_and_prints_the_table(tmp_path):
    """The GPU check's own steps on CPU: export, the real server with the torch backend and the ONNX
    Runtime default, driven at two concurrencies, table and JSON."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [
            "bash",
            "scripts/gpu_check.sh",
            "--cpu-only",
            "--quick",
            "--seconds",
            "0.5",
            "--concurrency",
            "1,2",
            "--cpu-concurrency",
            "1,2",
            "--json",
            str(out),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| model" in proc.stdout and "avg batch" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-only" and result["serving"].startswith("server")
    paths = {(r["path"], r["concurrency"]) for r in result["rows"]}
    assert paths == {("pytorch cpu", 1), ("pytorch cpu", 2), ("onnxruntime cpu", 1), ("onnxruntime cpu", 2)}
    for row in result["rows"]:
        assert row["errors"] == 0 and row["requests"] > 0 and row["throughput"] > 0
        assert row["avg_batch"] >= 1.0 and row["p99_ms"] >= row["p50_ms"] > 0


@pytest.mark.slow
def test_gpu_check_in_process_fallback(tmp_path):
    """The path a GPU box without grpc takes: the torch backend called directly at fixed batch sizes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [
            "bash",
            "scripts/gpu_check.sh",
            "--cpu-only",
            "--quick",
            "--in-process",
            "--no-onnx",
            "--seconds",
            "0.3",
            "--json",
            str(out),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["serving"].startswith("in-process")
    rows = result["rows"]
    assert [r["concurrency"] for r in rows] == [1, 4]  # quick batch sizes
    assert all(r["path"].startswith("pytorch cpu (in-process") and r["throughput"] > 0 for r in rows)
