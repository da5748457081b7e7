"""The runtime layer (cnncore/runtime): settings reach the sessions and compiled models, a config's
providers resolve as Triton's onnxruntime backend reads them, runners agree with the runtimes they wrap,
the throughput measurement is bounded, and importing the layer loads no runtime, torch, onnx or protos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cnncore.datatypes import _ORT, from_ort, to_numpy
from cnncore.runtime import (
    CPU_PROVIDER,
    OpenVinoSettings,
    OrtSettings,
    RuntimeUnavailable,
    compile_openvino,
    compiled_properties,
    numpy_dtype,
    openvino_available,
    openvino_runner,
    ort_providers,
    ort_runner,
    ort_session,
    requested_providers,
    runner,
    throughput,
    throughput_by_batch,
)
from conftest import affine_model, pool_model

ROOT = Path(__file__).resolve().parents[1]
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


@pytest.fixture
def pool_onnx(tmp_path: Path) -> Path:
    p = tmp_path / "pool.onnx"
    p.write_bytes(pool_model())
    return p


def test_importing_the_layer_loads_no_runtime_torch_onnx_or_protos() -> None:
    code = (
        "import sys, cnncore.runtime, export.runtimes; "
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'torch', 'onnx', 'protos') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_ort_settings_reach_the_session(pool_onnx: Path) -> None:
    settings = OrtSettings(
        intra_op_threads=1,
        inter_op_threads=2,
        allow_spinning=True,
        execution_mode="parallel",
        graph_optimization="basic",
        log_severity=3,
    )
    so = ort_session(pool_onnx, settings).get_session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 2)
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.log_severity_level == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    # the defaults are the server's: full optimisation, sequential, no spinning, CPU
    session = ort_session(pool_onnx)
    so = session.get_session_options()
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_providers() == [CPU_PROVIDER]


def test_a_session_from_bytes(tmp_path: Path) -> None:
    session = ort_session(affine_model())
    assert [i.name for i in session.get_inputs()] == ["a", "b"]


def test_providers_of_a_config() -> None:
    got = requested_providers(
        [
            ("tensorrt", {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}),
            ("cuda", {"device_id": "3"}),
        ],
        gpu=True,
        device_id=1,
    )
    assert got == [
        (
            "TensorrtExecutionProvider",
            {"device_id": "1", "trt_fp16_enable": "True", "trt_max_workspace_size": "1073741824"},
        ),
        ("CUDAExecutionProvider", {"device_id": "3"}),
    ]
    # KIND_GPU alone means the CUDA provider on the instance's device
    assert requested_providers(gpu=True, device_id=2) == [("CUDAExecutionProvider", {"device_id": "2"})]
    assert requested_providers([("openvino", {"device_type": "CPU"})]) == [
        ("OpenVINOExecutionProvider", {"device_type": "CPU"})
    ]
    with pytest.raises(
        RuntimeUnavailable, match="'tpu' is not supported by onnxruntime .*known: tensorrt, cuda, openvino"
    ):
        requested_providers([("tpu", {})])
    assert ort_providers() == (CPU_PROVIDER,)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this build has CUDA")
def test_a_provider_this_build_lacks_is_named() -> None:
    with pytest.raises(RuntimeUnavailable, match="lacks CUDAExecutionProvider .*available: .*CPUExecutionProvider"):
        ort_providers(gpu=True)


def test_ort_runner_casts_to_the_input_dtype_and_returns_every_output(tmp_path: Path) -> None:
    p = tmp_path / "two_outputs.onnx"
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["x"], ["n"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("n", TensorProto.FLOAT, ["N", 4]),
        ],
    )
    p.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString())
    run = ort_runner(p)
    assert (run.input_name, run.input_dtype, run.input_shape, run.output_names) == ("x", np.float32, [4], ["r", "n"])
    x = np.linspace(-1, 1, 12).reshape(3, 4)  # float64: the runner casts
    out = run(x)
    assert sorted(out) == ["n", "r"] and out["r"].dtype == np.float32
    np.testing.assert_array_equal(out["r"], np.maximum(x, 0).astype(np.float32))
    np.testing.assert_array_equal(out["n"], -x.astype(np.float32))


def test_numpy_dtype_agrees_with_the_protocol_table() -> None:
    # the runtime layer reads ORT type strings without the protos; it must say what cnncore.datatypes says
    for ort_type in _ORT:
        assert numpy_dtype(ort_type) == to_numpy(from_ort(ort_type)), ort_type


@needs_openvino
def test_openvino_settings_reach_the_compiled_model(pool_onnx: Path, tmp_path: Path) -> None:
    cache = tmp_path / "ov_cache"
    settings = OpenVinoSettings(threads=2, streams=2, performance_hint="THROUGHPUT", cache_dir=cache)
    props = settings.properties()
    assert props == {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_NUM_THREADS": 2,
        "NUM_STREAMS": 2,
        "ENABLE_CPU_PINNING": False,  # unpinned unless asked: export measures as the server runs
        "CACHE_DIR": str(cache),
    }
    compiled = compile_openvino(pool_onnx, props)
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    assert int(compiled.get_property("NUM_STREAMS")) == 2
    assert "THROUGHPUT" in str(compiled.get_property("PERFORMANCE_HINT"))
    # FP32 stays FP32 on CPUs with bfloat16 support
    assert "float32" in str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    assert any(cache.iterdir()), "CACHE_DIR holds the compiled blob"
    # extra properties win over the fields
    assert OpenVinoSettings(extra={"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"}).properties() == {
        "INFERENCE_PRECISION_HINT": "bf16",
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
    }


@needs_openvino
def test_bounded_dynamic_batch(pool_onnx: Path) -> None:
    compiled = compile_openvino(pool_onnx, max_batch=4)
    first = list(compiled.inputs[0].get_partial_shape())[0]
    assert (first.get_min_length(), first.get_max_length()) == (1, 4)
    unbounded = list(compile_openvino(pool_onnx).inputs[0].get_partial_shape())[0]
    assert unbounded.is_dynamic and unbounded.get_max_length() == -1


@needs_openvino
def test_openvino_runner_agrees_with_onnxruntime(pool_onnx: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224))
    want = runner(pool_onnx, "onnxruntime", threads=1)(x)
    ov_run = openvino_runner(pool_onnx, OpenVinoSettings(threads=1))
    assert (ov_run.input_name, ov_run.input_shape, ov_run.output_names) == ("x", [3, 224, 224], ["y"])
    got = ov_run(x)
    first = got["y"].copy()
    ov_run(x + 1.0)  # the request's buffers are reused: the first answer must not change
    np.testing.assert_array_equal(got["y"], first)
    np.testing.assert_allclose(got["y"], want["y"], rtol=0, atol=1e-5)


def test_unknown_runtime_is_refused(pool_onnx: Path) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'; known: onnxruntime, openvino"):
        runner(pool_onnx, "tensorflow")


class _Counting:
    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.shapes.append(x.shape)
        return {"y": x}


def test_throughput_is_bounded_and_counts_images() -> None:
    run = _Counting()
    sample = np.zeros((3, 8, 8), np.float32)
    rate = throughput(run, sample, batch=4, seconds=0.0, min_runs=3)
    assert run.shapes == [(4, 3, 8, 8)] * 4  # one warm-up, then exactly min_runs when the time is already up
    assert rate > 0
    run = _Counting()
    rates = throughput_by_batch(run, sample, (1, 8), seconds=0.0)
    assert sorted(rates) == [1, 8] and all(r > 0 for r in rates.values())
    assert run.shapes == [(1, 3, 8, 8)] * 3 + [(8, 3, 8, 8)] * 3


def test_throughput_of_a_real_runner(pool_onnx: Path) -> None:
    run = ort_runner(pool_onnx, OrtSettings(intra_op_threads=1))
    assert throughput(run, np.zeros((3, 224, 224), np.float32), batch=2, seconds=0.05) > 0


def test_export_runtimes_delegate_to_the_layer(pool_onnx: Path) -> None:
    from export import runtimes

    assert runtimes.RuntimeMissing is RuntimeUnavailable
    run = runtimes.runner(pool_onnx, "onnxruntime")
    so = run.session.get_session_options()  # type: ignore[attr-defined]
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 1)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@needs_openvino
def test_compiled_properties_report_what_openvino_resolved(pool_onnx: Path) -> None:
    latency = compiled_properties(compile_openvino(pool_onnx, OpenVinoSettings(threads=2).properties()))
    assert latency["PERFORMANCE_HINT"] == "LATENCY" and latency["NUM_STREAMS"] == "1"
    assert latency["INFERENCE_NUM_THREADS"] == "2" and latency["INFERENCE_PRECISION_HINT"] == "f32"
    settings = OpenVinoSettings(threads=2, performance_hint="THROUGHPUT", streams=2, cpu_pinning=False)
    assert settings.properties()["ENABLE_CPU_PINNING"] is False
    resolved = compiled_properties(compile_openvino(pool_onnx, settings.properties()))
    assert resolved["NUM_STREAMS"] == "2" and resolved["OPTIMAL_NUMBER_OF_INFER_REQUESTS"] == "2"
    assert resolved["ENABLE_CPU_PINNING"] == "False"
