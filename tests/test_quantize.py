"""INT8 quantization and the accuracy gate: QDQ format TensorRT reads, real calibration data, clear errors,
a refused INT8 (not written, non-zero exit, message with metric, both values and threshold), and the
default repository's recorded choice (model.json, config parameters, `export list` / `describe`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT

pytest.importorskip("nncf")
pytestmark = [pytest.mark.timeout(900), pytest.mark.precision]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def encoder_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained Fashion-MNIST encoder exported to FP32 ONNX (a few seconds)."""
    from export.onnx_export import export_onnx
    from models.registry import get_entry, get_model

    path = tmp_path_factory.mktemp("enc") / "model.onnx"
    export_onnx(get_model("fashion_mnist_encoder", weights="default"), get_entry("fashion_mnist_encoder"), path)
    return path


def test_quantized_graph_is_qdq_int8_that_tensorrt_reads_and_passes_the_gate(
    encoder_fp32: Path, tmp_path: Path
) -> None:
    from cnncore.spec import ModelMeta
    from export.accuracy_gate import GateThresholds, check, gate_paths
    from export.quantize import is_qdq, quantize_onnx
    from export.trt_lint import lint_model
    from models.data.calibration import calibration_inputs
    from models.registry import get_entry

    entry = get_entry("fashion_mnist_encoder")
    calib, desc = calibration_inputs("fashion_mnist_encoder", entry.preprocess)
    assert len(calib) == 256 and "Fashion-MNIST training images" in desc
    result = quantize_onnx(encoder_fp32, tmp_path / "int8.onnx", calib, description=desc)
    q = onnx.load(str(result.path))
    assert is_qdq(q) and not is_qdq(onnx.load(str(encoder_fp32)))
    assert result.quantized_nodes >= 2
    inits = {i.name: i for i in q.graph.initializer}
    zero_points = [
        inits[n.input[2]]
        for n in q.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
    ]
    assert zero_points and all(
        z.data_type == TensorProto.INT8 and not numpy_helper.to_array(z).any() for z in zero_points
    ), "TensorRT needs INT8 zero points of 0"
    report = lint_model(q)
    assert report.ok, [str(i) for i in report.issues]

    meta = ModelMeta(name="fashion_mnist_encoder", task=entry.task, preprocess=entry.preprocess)
    figures = gate_paths(meta, encoder_fp32, result.path)
    assert [f.metric for f in figures] == ["retrieval_1nn_accuracy_pct"]
    f = figures[0]
    assert f.passed and f.fp32 > 70 and abs(f.fp32 - f.int8) <= 1.0, f
    check(meta, figures)  # passes: no exception
    # the TensorRT engine builder builds the QDQ file as an explicit-quantization INT8 engine, FP32 as FP16
    from export.tensorrt.build import engine_precision

    assert engine_precision(result.path, "fp16") == "int8" and engine_precision(encoder_fp32, "fp16") == "fp16"
    strict = gate_paths(meta, encoder_fp32, result.path, thresholds=GateThresholds(accuracy_points=-50.0))
    assert not strict[0].passed


def test_no_calibration_data_and_broken_onnx_are_clear_errors(encoder_fp32: Path, tmp_path: Path) -> None:
    from cnncore.spec import PreprocessSpec
    from export.quantize import QuantizationError, quantize_onnx
    from models.data.calibration import CalibrationDataMissing, calibration_inputs

    with pytest.raises(QuantizationError, match="no calibration data"):
        quantize_onnx(encoder_fp32, tmp_path / "q.onnx", np.zeros((0, 1, 28, 28), np.float32))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf at all")
    with pytest.raises(QuantizationError, match="not a valid ONNX model"):
        quantize_onnx(broken, tmp_path / "q.onnx", np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(QuantizationError, match="no such ONNX file"):
        quantize_onnx(tmp_path / "absent.onnx", tmp_path / "q.onnx", np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(CalibrationDataMissing, match="no calibration data defined"):
        calibration_inputs("cifar10_resnet20", PreprocessSpec(input_size=(32, 32)))
    os.environ["FASHION_MNIST_DIR"] = str(tmp_path)  # an empty directory: the dataset is "not installed"
    try:
        with pytest.raises(CalibrationDataMissing, match="dataset-fashion-mnist"):
            calibration_inputs("fashion_resnet20", PreprocessSpec(input_size=(28, 28), color="L"))
    finally:
        del os.environ["FASHION_MNIST_DIR"]
    assert not (tmp_path / "q.onnx").exists()


def test_unsigned_activation_quantizers_become_signed_with_the_same_range() -> None:
    from export.quantize import signed_activations
    from export.runtimes import ort_runner

    scale = np.array(0.02, np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.array(0, np.uint8), "zp")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    x = np.array([[0.0, 1.0, 2.5, 5.0]], np.float32)
    converted = signed_activations(model)
    zp = next(i for i in converted.graph.initializer if i.name == "zp")
    assert zp.data_type == TensorProto.INT8
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"signed-{os.getpid()}.onnx"
    onnx.save(converted, str(path))
    try:
        y = ort_runner(path)(x)["y"]
    finally:
        path.unlink()
    # the range [0, 255 * 0.02] survives; the step doubles to 0.02 * 255/127
    np.testing.assert_allclose(y, x, atol=0.02 * 255 / 127 / 2 + 1e-6)


def test_a_refused_int8_is_not_written_and_says_why(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    res = _cli("quantize", "fashion_mnist_encoder", "--repository", str(repo), "--gate-accuracy", "-50")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr
    assert "INT8 refused by the accuracy gate" in err, err
    assert "retrieval_1nn_accuracy_pct" in err and "vs FP32" in err and "threshold -50" in err, err
    assert not (repo / "fashion_mnist_encoder").exists()
    # with the default gate it is written; a second run keeps that choice (same FP32 parent, same
    # options) instead of measuring again, so the repository does not change
    assert _cli("quantize", "fashion_mnist_encoder", "--repository", str(repo)).returncode == 0
    snapshot = {p: p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}
    assert _cli("quantize", "fashion_mnist_encoder", "--repository", str(repo)).returncode == 0
    assert {p: p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()} == snapshot
    from cnncore.spec import ModelMeta

    serving = ModelMeta.read(repo / "fashion_mnist_encoder").serving
    assert serving is not None and serving.precision == "int8" and serving.gate[0].passed


def test_default_repository_serves_the_fastest_gated_variant_and_says_which(default_repository: Path) -> None:
    from cnncore.config import load_config
    from cnncore.spec import ModelMeta
    from export.quantize import is_qdq
    from export.variants import score

    names = sorted(p.name for p in default_repository.iterdir() if (p / "config.pbtxt").is_file())
    assert names
    for name in names:
        d = default_repository / name
        serving = ModelMeta.read(d).serving
        assert serving is not None, name
        cfg = load_config(d)
        assert cfg.backend == serving.runtime, name
        assert cfg.parameters["precision"].string_value == serving.precision.upper(), name
        assert is_qdq(onnx.load(str(d / "1" / "model.onnx"), load_external_data=False)) == (serving.precision == "int8")
        # every gated variant stays, fastest first, with the CPU it was measured on
        assert serving.cpu is not None and serving.variants, name
        assert (serving.variants[0].precision, serving.variants[0].runtime) == (serving.precision, serving.runtime)
        assert any(v.precision == "fp32" for v in serving.variants), name
        for v in serving.variants:
            assert (d / "1" / v.file).is_file(), (name, v.file)
        assert (cfg.parameters["INFERENCE_PRECISION_HINT"].string_value == "bf16") == (serving.precision == "bf16")
        if serving.precision != "fp32":
            assert serving.gate and all(f.passed for f in serving.gate), (name, serving.gate)
            assert serving.gate[0].variant == f"{serving.precision}/{serving.runtime}"
        if serving.precision == "int8":
            assert serving.calibration and serving.fp32_onnx_sha256
        elif serving.precision == "fp32" and serving.gate:  # a faster variant was refused: recorded with its figures
            assert not all(f.passed for f in serving.gate) and "refused" in serving.reason, (name, serving)
            assert " refused: " in cfg.parameters["accuracy_gate"].string_value, name
        if serving.gate:
            for f in serving.gate:
                assert f.metric in cfg.parameters["accuracy_gate"].string_value, name
        parity = json.loads((d / "parity.json").read_text())
        assert parity["served"]["precision"] == serving.precision and parity["served"]["runtime"] == serving.runtime
        tp = serving.throughput
        assert tp, f"{name}: nothing measured"
        served = score(tp, serving.precision, serving.runtime)
        for key in tp:
            p, r, _ = key.split("/")
            if p == "fp32" or any((v.precision, v.runtime) == (p, r) for v in serving.variants):
                # every FP32 variant and every gated one qualifies: none may be faster than the served one
                assert score(tp, p, r) <= served, (name, key, tp)
    res = _cli("list", "--repository", str(default_repository), timeout=300)
    assert res.returncode == 0, res.stderr
    for name in names:
        serving = ModelMeta.read(default_repository / name).serving
        assert serving is not None, name
        assert f"{serving.precision}/{serving.runtime}" in next(ln for ln in res.stdout.splitlines() if name in ln)


@pytest.mark.slow
def test_noise_floor_gate_refuses_a_bad_quantizer_and_passes_a_good_one(
    default_repository: Path, tmp_path: Path
) -> None:
    """MobileNetV2 on held-out photos (no labelled ImageNet offline): onnxruntime's quantize_static S8S8
    (MinMax) is refused, NNCF's INT8 for OpenVINO passes; FP32's own noise floor is measured in the run."""
    from cnncore.spec import ModelMeta
    from export.accuracy_gate import GateRefused, check, run_gate
    from export.quantize import quantize_onnx
    from export.runtimes import variant_runner
    from export.variants import FP32_FILENAME
    from models.data.calibration import calibration_inputs

    d = default_repository / "mobilenet_v2"
    meta = ModelMeta.read(d)
    fp32 = d / "1" / FP32_FILENAME
    calib, desc = calibration_inputs("mobilenet_v2", meta.preprocess)
    bad = quantize_onnx(fp32, tmp_path / "s8s8.onnx", calib, description=desc, backend="onnxruntime").path
    good = quantize_onnx(fp32, tmp_path / "nncf.onnx", calib, description=desc, flavor="openvino").path
    ref = variant_runner(fp32, "fp32", "onnxruntime")
    refused = run_gate(meta, ref, variant_runner(bad, "int8", "onnxruntime"), variant="int8/onnxruntime")
    figures = {f.metric: f for f in refused}
    assert set(figures) == {"confident_top1_agreement_pct", "top1_disagreement_pct", "mean_kl_nats"}
    assert not figures["mean_kl_nats"].passed and not figures["top1_disagreement_pct"].passed, refused
    assert figures["top1_disagreement_pct"].threshold == figures["top1_disagreement_pct"].fp32 > 0
    with pytest.raises(GateRefused, match=r"mean_kl_nats INT8 [0-9.]+ vs FP32 0 \(threshold <= 0.05\)"):
        check(meta, refused)
    passed = run_gate(meta, ref, variant_runner(good, "int8", "openvino"), variant="int8/openvino")
    assert all(f.passed for f in passed), passed
    check(meta, passed)


def test_bf16_is_the_fp32_file_on_openvino_with_the_precision_hint(tmp_path: Path) -> None:
    """`--precision bf16`: the FP32 file served by OpenVINO with INFERENCE_PRECISION_HINT bf16 in the
    config, gated like INT8; on a CPU without BF16 instructions it is refused, saying why."""
    pytest.importorskip("openvino")
    from cnncore.config import load_config
    from cnncore.cpu import current_cpu
    from cnncore.spec import ModelMeta

    repo = tmp_path / "repo"
    res = _cli(
        "onnx",
        "fashion_mnist_encoder",
        "--repository",
        str(repo),
        "--precision",
        "bf16",
        "--parity-batch-sizes",
        "1",
        "2",
    )
    cpu = current_cpu()
    if not cpu.computes_bf16():
        assert res.returncode == 1 and "no BF16 instructions" in res.stderr, res.stderr[-2000:]
        assert not (repo / "fashion_mnist_encoder").exists()
        return
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    d = repo / "fashion_mnist_encoder"
    cfg = load_config(d)
    assert cfg.backend == "openvino" and cfg.default_model_filename == "model.onnx"
    assert cfg.parameters["INFERENCE_PRECISION_HINT"].string_value == "bf16"
    assert cfg.parameters["precision"].string_value == "BF16"
    assert "retrieval_1nn_accuracy_pct BF16" in cfg.parameters["accuracy_gate"].string_value
    assert (d / "1" / "model.onnx").read_bytes() == (d / "1" / "model.fp32.onnx").read_bytes()
    serving = ModelMeta.read(d).serving
    assert serving is not None and serving.precision == "bf16" and serving.pinned and serving.gate[0].passed
    from server.backends.base import BackendOptions
    from server.backends.openvino_backend import OpenVinoBackend

    backend = OpenVinoBackend(
        d / "1" / "model.onnx", BackendOptions(max_batch_size=4, extra=(("INFERENCE_PRECISION_HINT", "bf16"),))
    )
    assert "bfloat16" in str(backend.compiled.get_property("INFERENCE_PRECISION_HINT"))
