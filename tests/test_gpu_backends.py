"""GPU backends: which backend a config asks for, clear refusals where the machine lacks it, and the
torch.export backend's parity with ONNX Runtime (on CPU here; on CUDA where there is a GPU)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.torch_program import PROGRAM_FILENAME, export_program, load_program, save_program
from modelrepo.config import parse_config
from server.backends.base import BackendOptions, BackendUnavailable, available_backends, create_backend
from server.backends.selection import backend_kind, check_ort_providers, ort_execution_providers, select_backend
import server.backends.torch_program  # noqa: F401  (registers "pytorch")
import server.backends.trt_engine  # noqa: F401  (registers "tensorrt")

HAVE_CUDA = torch.cuda.is_available()
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None

IO = """
max_batch_size: 8
input [{ name: "input" data_type: TYPE_FP32 dims: [3, 16, 16] }]
output [{ name: "logits" data_type: TYPE_FP32 dims: [5] }]
"""


def cfg(text: str):
    return parse_config('name: "m"\n' + text + IO)


# ------------------------------------------------------------------ config -> backend

@pytest.mark.parametrize("text, kind", [
    ('platform: "tensorrt_plan"', "tensorrt"),
    ('backend: "tensorrt"', "tensorrt"),
    ('platform: "onnxruntime_onnx"', "onnxruntime"),
    ('backend: "onnxruntime"', "onnxruntime"),
    ('platform: "pytorch_libtorch"', "pytorch"),
    ('backend: "pytorch"', "pytorch"),
    ("", "onnxruntime"),
])
def test_backend_kind_from_platform_or_backend(text, kind):
    assert backend_kind(cfg(text)) == kind


@pytest.mark.parametrize("text, message", [
    ('backend: "tensorflow"', "unknown backend 'tensorflow'"),
    ('platform: "tensorflow_savedmodel"', "unsupported platform"),
    ('platform: "tensorrt_plan" backend: "pytorch"', "contradicts"),
])
def test_unknown_or_contradictory_backend_is_refused(text, message):
    with pytest.raises(BackendUnavailable, match=message):
        backend_kind(cfg(text))


def test_ort_tensorrt_accelerator_translates_triton_parameters():
    c = cfg('''backend: "onnxruntime"
optimization { execution_accelerators { gpu_execution_accelerator [{
  name: "tensorrt"
  parameters { key: "precision_mode" value: "FP16" }
  parameters { key: "max_workspace_size_bytes" value: "1073741824" }
  parameters { key: "trt_engine_cache_enable" value: "true" }
  parameters { key: "trt_engine_cache_path" value: "/cache" } }] } }
instance_group [{ kind: KIND_GPU gpus: [1] }]''')
    providers = ort_execution_providers(c, device_id=1)
    assert [p for p, _ in providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt_opts = providers[0][1]
    assert trt_opts == {"device_id": "1", "trt_fp16_enable": "True", "trt_max_workspace_size": "1073741824",
                        "trt_engine_cache_enable": "True", "trt_engine_cache_path": "/cache"}


def test_ort_cuda_accelerator_and_gpu_instance_group():
    c = cfg('backend: "onnxruntime"\noptimization { execution_accelerators { gpu_execution_accelerator [{ name: "cuda" }] } }')
    assert [p for p, _ in ort_execution_providers(c)] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    c = cfg('backend: "onnxruntime"\ninstance_group [{ kind: KIND_GPU count: 2 }]')
    assert [p for p, _ in ort_execution_providers(c)] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    c = cfg('backend: "onnxruntime"\ninstance_group [{ kind: KIND_CPU count: 2 }]')
    assert ort_execution_providers(c) == [("CPUExecutionProvider", {})]
    c = cfg('backend: "onnxruntime"\noptimization { execution_accelerators { gpu_execution_accelerator [{ name: "openvino" }] } }')
    with pytest.raises(BackendUnavailable, match="unknown gpu_execution_accelerator 'openvino'"):
        ort_execution_providers(c)


def test_select_backend_files_and_options(tmp_path):
    choice = select_backend(cfg('backend: "onnxruntime"'), tmp_path / "1", available_ort_providers=["CPUExecutionProvider"])
    assert choice.kind == "onnxruntime" and choice.model_file == tmp_path / "1" / "model.onnx"
    assert json.loads(choice.option("providers")) == [["CPUExecutionProvider", {}]]
    choice = select_backend(cfg('platform: "tensorrt_plan"'), tmp_path / "1")
    assert choice.kind == "tensorrt" and choice.model_file == tmp_path / "1"  # engines.json picks the engine
    choice = select_backend(cfg('platform: "tensorrt_plan"\ndefault_model_filename: "custom.plan"'), tmp_path / "1")
    assert choice.model_file == tmp_path / "1" / "custom.plan"
    choice = select_backend(cfg('backend: "pytorch"\ninstance_group [{ kind: KIND_CPU }]'), tmp_path / "1")
    assert choice.kind == "pytorch" and choice.model_file.name == PROGRAM_FILENAME and choice.option("device") == "cpu"
    choice = select_backend(cfg('backend: "pytorch"\ninstance_group [{ kind: KIND_GPU gpus: [2] }]'), tmp_path / "1")
    assert choice.option("device") == "cuda" and choice.options.device_id == 2
    with pytest.raises(BackendUnavailable, match="KIND_CPU"):
        select_backend(cfg('platform: "tensorrt_plan"\ninstance_group [{ kind: KIND_CPU }]'), tmp_path / "1")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime build has the CUDA provider")
def test_gpu_accelerator_on_cpu_onnxruntime_is_refused_not_silently_cpu(tmp_path):
    c = cfg('backend: "onnxruntime"\noptimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt" }] } }')
    with pytest.raises(BackendUnavailable) as exc:
        select_backend(c, tmp_path / "1")
    msg = str(exc.value)
    assert "TensorrtExecutionProvider" in msg and "CUDAExecutionProvider" in msg and "onnxruntime-gpu" in msg
    check_ort_providers([("CPUExecutionProvider", {})], "m")  # the CPU default is always fine


def test_backends_are_registered():
    assert {"tensorrt", "pytorch"} <= set(available_backends())


@pytest.mark.skipif(HAVE_TRT, reason="checks the refusal on machines without TensorRT")
def test_tensorrt_backend_without_tensorrt_fails_that_model_only(tmp_path):
    with pytest.raises(BackendUnavailable, match="needs TensorRT, which is not installed"):
        create_backend("tensorrt", tmp_path, BackendOptions())


@pytest.mark.skipif(HAVE_CUDA, reason="checks the refusal on machines without CUDA")
def test_torch_backend_asked_for_gpu_without_cuda_is_refused(tmp_path):
    with pytest.raises(BackendUnavailable, match="sees no CUDA device"):
        create_backend("pytorch", tmp_path / PROGRAM_FILENAME, BackendOptions(extra=(("device", "cuda"),)))


def test_torch_backend_missing_program_is_refused(tmp_path):
    with pytest.raises(BackendUnavailable, match="no exported program"):
        create_backend("pytorch", tmp_path / PROGRAM_FILENAME, BackendOptions(extra=(("device", "cpu"),)))


def test_one_bad_model_does_not_stop_the_others(tmp_path, exported):
    """Selection + creation per model, as the loader does it: the TensorRT / GPU models fail with their
    reasons, the CPU one loads and runs."""
    vdir, _, _ = exported
    configs = {
        "engine": 'platform: "tensorrt_plan"',
        "ort_gpu": 'backend: "onnxruntime"\ninstance_group [{ kind: KIND_GPU }]',
        "torch_cpu": 'backend: "pytorch"\ninstance_group [{ kind: KIND_CPU }]',
    }
    loaded, failed = {}, {}
    for name, text in configs.items():
        try:
            choice = select_backend(cfg(text), vdir)
            loaded[name] = create_backend(choice.kind, choice.model_file, choice.options)
        except BackendUnavailable as exc:
            failed[name] = str(exc)
    assert "torch_cpu" in loaded
    if not HAVE_TRT:
        assert "TensorRT" in failed["engine"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDAExecutionProvider" in failed["ort_gpu"]
    out = loaded["torch_cpu"].execute({"input": np.zeros((2, 3, 16, 16), np.float32)})
    assert out["logits"].shape == (2, 5)


# ------------------------------------------------------------------ torch.export program vs ONNX Runtime

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
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
    torch.onnx.export(program, (torch.randn(2, 3, 16, 16),), str(vdir / "model.onnx"), input_names=["input"],
                      output_names=["logits"], dynamo=True, external_data=False)
    return vdir, model, ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])


def test_program_archive_carries_tensor_names(exported):
    vdir, _, _ = exported
    _, inputs, outputs = load_program(vdir / PROGRAM_FILENAME)
    assert inputs == ["input"] and outputs == ["logits"]


def test_torch_backend_on_cpu_matches_onnx_runtime(exported):
    vdir, model, session = exported
    backend = create_backend("pytorch", vdir / PROGRAM_FILENAME, BackendOptions(extra=(("device", "cpu"),)))
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


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA GPU visible to torch")
def test_torch_backend_on_cuda_matches_onnx_runtime(exported):
    vdir, _, session = exported
    backend = create_backend("pytorch", vdir / PROGRAM_FILENAME, BackendOptions(extra=(("device", "cuda"),)))
    assert backend.device == "cuda:0"
    x = np.random.default_rng(2).standard_normal((8, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(backend.execute({"input": x})["logits"], session.run(None, {"input": x})[0],
                               rtol=1e-2, atol=1e-2)  # TF32 convolutions on Ampere+ are allowed to differ a little
    backend.close()
