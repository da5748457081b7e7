"""`export --input-dtype uint8`: models that take UINT8 pixels and normalize inside the graph.

Stated tolerance: on the same pictures, a pixel model's outputs differ from its FP32 parent's (fed the
float preprocessing) by at most UINT8_TOLERANCE (1e-3) of the output's magnitude; the two differ only
in float rounding of one multiply-add, and measure ~1e-7 here.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from client import InferenceClient, VisionClient
from cnncore.config import load_config
from cnncore.postprocess import softmax
from cnncore.preprocess import preprocess
from cnncore.spec import ModelMeta, PreprocessSpec
from conftest import ROOT
from export.uint8_input import UINT8_TOLERANCE, Uint8InputError, add_pixel_input, parity_with_parent
from protos.model_config_pb2 import DataType

IMAGENET = PreprocessSpec(
    input_size=(24, 20),
    resize="shorter_side_then_center_crop",
    resize_shorter_side=28,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
FASHION = PreprocessSpec(input_size=(28, 28), color="L", mean=(0.286,), std=(0.353,), invert=True)


def conv_model(channels: int, height: int, width: int, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """input [N,C,H,W] -> Conv 3x3 (4 filters, random weights) -> Relu -> GlobalAveragePool -> logits [N,4,1,1]."""
    rng = np.random.default_rng(channels)
    dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    w = numpy_helper.from_array(rng.standard_normal((4, channels, 3, 3)).astype(dtype), "w")
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["logits"]),
        ],
        "conv",
        [helper.make_tensor_value_info("input", elem, ["N", channels, height, width])],
        [helper.make_tensor_value_info("logits", elem, ["N", 4, 1, 1])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def qdq_model(channels: int, height: int, width: int) -> onnx.ModelProto:
    """conv_model with its input quantized and dequantized (INT8 QDQ, as the INT8 export writes), and the
    kind of stale value_info its quantizer leaves (a zero point typed UINT8 where the initializer is
    INT8): ONNX Runtime runs it, full shape inference would reject it."""
    m = conv_model(channels, height, width)
    g = m.graph
    for node in g.node:
        node.input[:] = ["input_dq" if x == "input" else x for x in node.input]
    g.initializer.extend(
        [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "zp")]
    )
    qdq = [
        helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["input_q"]),
        helper.make_node("DequantizeLinear", ["input_q", "s", "zp"], ["input_dq"]),
    ]
    old = list(g.node)
    del g.node[:]
    g.node.extend(qdq + old)
    g.value_info.append(helper.make_tensor_value_info("zp", TensorProto.UINT8, []))  # the initializer is INT8
    return m


def test_pixel_input_in_front_of_a_quantized_parent(tmp_path: Path) -> None:
    spec = IMAGENET
    parent = qdq_model(3, *spec.input_size)
    onnx.save(parent, str(tmp_path / "parent.onnx"))
    onnx.save(add_pixel_input(parent, spec, "input"), str(tmp_path / "pixels.onnx"))
    report = parity_with_parent(tmp_path / "parent.onnx", tmp_path / "pixels.onnx", spec, "input")
    assert report["ok"], report


@pytest.mark.parametrize(
    "spec,channels,elem",
    [(IMAGENET, 3, TensorProto.FLOAT), (FASHION, 1, TensorProto.FLOAT), (IMAGENET, 3, TensorProto.FLOAT16)],
    ids=["rgb-normalized", "gray-inverted", "fp16-model"],
)
def test_pixel_model_equals_its_parent_on_the_same_pictures(
    tmp_path: Path, spec: PreprocessSpec, channels: int, elem: int
) -> None:
    h, w = spec.input_size
    parent = conv_model(channels, h, w, elem)
    pixels = add_pixel_input(parent, spec, "input")
    assert pixels.graph.input[0].name == "input"  # clients keep the input name
    assert pixels.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    onnx.save(parent, str(tmp_path / "parent.onnx"))
    onnx.save(pixels, str(tmp_path / "pixels.onnx"))
    report = parity_with_parent(tmp_path / "parent.onnx", tmp_path / "pixels.onnx", spec, "input")
    assert report["ok"], report
    if elem == TensorProto.FLOAT:  # float rounding of one multiply-add, far inside the stated tolerance
        assert report["max_relative_difference"]["logits"] < 1e-5, report


def test_pixels_are_the_float_preprocessing_before_scaling() -> None:
    """One implementation: pixels=True stops where the float path starts scaling."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    for spec in (IMAGENET, FASHION):
        x, geo_x = preprocess(picture, spec)
        px, geo_px = preprocess(picture, spec, pixels=True)
        assert px.dtype == np.uint8 and px.shape == x.shape and geo_px == geo_x
        scaled = px.astype(np.float32) / 255.0
        scaled = 1.0 - scaled if spec.invert else scaled
        mean = np.asarray(spec.mean, np.float32)[:, None, None]
        std = np.asarray(spec.std, np.float32)[:, None, None]
        np.testing.assert_allclose((scaled - mean) / std, x, rtol=1e-6, atol=1e-6)


def test_inputs_that_are_not_images_are_refused() -> None:
    g = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["y"])],
        "vec",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
    )
    vec = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(Uint8InputError, match="not a float NCHW image tensor"):
        add_pixel_input(vec, IMAGENET, "input")
    with pytest.raises(Uint8InputError, match="no input 'pixels'"):
        add_pixel_input(conv_model(3, 8, 8), IMAGENET, "pixels")
    with pytest.raises(Uint8InputError, match="4 channels"):
        add_pixel_input(conv_model(4, 8, 8), IMAGENET, "input")


def _export(repo: Path, *extra: str) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "onnx",
            "fashion_resnet20",
            "--weights",
            "none",
            "--repository",
            str(repo),
            "--parity-batch-sizes",
            "1",
            "2",
            "--precision",
            "fp32",
            "--runtime",
            "onnxruntime",
            *extra,
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.timeout(900)
def test_exported_pixel_model_serves_pictures_like_its_fp32_parent(tmp_path: Path, server_factory) -> None:
    fp32, u8 = tmp_path / "fp32", tmp_path / "uint8"
    _export(fp32)
    _export(u8, "--input-dtype", "uint8")
    cfg = load_config(u8 / "fashion_resnet20" / "config.pbtxt")
    assert cfg.input[0].data_type == DataType.TYPE_UINT8
    assert all(s.inputs["input"].data_type == DataType.TYPE_UINT8 for s in cfg.model_warmup)

    spec = ModelMeta.read(u8 / "fashion_resnet20").preprocess
    parent = ort.InferenceSession(
        str(fp32 / "fashion_resnet20" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(3)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L") for h, w in ((28, 28), (40, 31))]
    pictures.append(Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), "RGB"))
    srv = server_factory(u8)
    with InferenceClient(srv.grpc_url) as client, VisionClient(srv.grpc_url) as vision:
        for picture in pictures:
            x, _ = preprocess(picture, spec)
            want = parent.run(None, {"input": x[None]})[0][0]
            px, _ = preprocess(picture, spec, pixels=True)
            got = client.infer("fashion_resnet20", {"input": px[None]})["logits"][0]  # 784 bytes, not 3136
            assert np.abs(got - want).max() <= UINT8_TOLERANCE * np.abs(want).max()
            png = io.BytesIO()
            picture.save(png, format="PNG")
            result = vision.classify("fashion_resnet20", [png.getvalue()], top_k=10).results[0]
            scores = {c.class_index: c.score for c in result.classes}
            np.testing.assert_allclose([scores[i] for i in range(10)], softmax(want), atol=1e-5)


@pytest.mark.timeout(900)
def test_auto_pixel_reexport_keeps_the_choice_without_measuring(tmp_path: Path) -> None:
    """`--input-dtype uint8 --precision auto` twice: the second run finds the recorded choice (parity.json
    records the parent's hash, the kept variant files are the parents) and rewrites nothing."""

    def export() -> subprocess.CompletedProcess:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "export",
                "onnx",
                "fashion_mnist_encoder",
                "--repository",
                str(tmp_path),
                "--parity-batch-sizes",
                "1",
                "2",
                "--input-dtype",
                "uint8",
                "--precision",
                "auto",
            ],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    first = export()
    assert "throughput of" in first.stdout
    snapshot = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    second = export()
    assert "throughput of" not in second.stdout and "accuracy gate" not in second.stdout, second.stdout[-2000:]
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == snapshot
    parity = json.loads((tmp_path / "fashion_mnist_encoder" / "parity.json").read_text())
    assert parity["uint8_input"]["parent_sha256"] == parity["served"]["onnx_sha256"]
