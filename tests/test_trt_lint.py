"""TensorRT lint on hand-made ONNX graphs: graphs TensorRT 10 accepts pass, the others fail naming the node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.trt_lint import TensorRTLintError, check_model, lint_model, operator_table

ROOT = Path(__file__).resolve().parents[1]


def _model(nodes, inputs, outputs, initializers=(), opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _conv_relu(dtype=TensorProto.FLOAT):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), dtype=np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["out"], name="relu1"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", dtype, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("out", dtype, ["batch", 4, 8, 8])],
        [w],
    )


def test_table_is_recorded_with_source_and_version():
    t = operator_table()
    assert t["tensorrt_version"].startswith("10.")
    assert "onnx-tensorrt" in t["source"]
    assert t["operators"]["Conv"]["supported"] and not t["operators"]["Unique"]["supported"]
    assert len(t["operators"]) > 150


def test_supported_graph_passes():
    model = _conv_relu()
    onnx.checker.check_model(model, full_check=True)
    report = check_model(model)
    assert report.ok and report.op_types == {"Conv": 1, "Relu": 1} and report.opset == 18


def test_int64_shape_arithmetic_passes():
    # what the dynamo exporter emits for flatten: int64 shape tensors feeding Reshape
    shape = numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["out"], name="flatten")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8])],
        [shape],
    )
    assert lint_model(model).ok


def test_float64_tensor_fails_naming_the_node():
    model = _conv_relu(TensorProto.DOUBLE)
    with pytest.raises(TensorRTLintError) as err:
        check_model(model)
    msg = str(err.value)
    assert "conv1" in msg and "DOUBLE" in msg


def test_float64_initializer_fails():
    w = numpy_helper.from_array(np.ones((1,), dtype=np.float64), "w64")
    nodes = [
        helper.make_node("Cast", ["w64"], ["w32"], name="cast_w", to=TensorProto.FLOAT),
        helper.make_node("Add", ["input", "w32"], ["out"], name="add_w"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    issues = lint_model(model).issues
    assert any(i.node == "cast_w" and "w64" in i.reason and "DOUBLE" in i.reason for i in issues)


def test_unsupported_op_fails_with_name_and_op_type():
    nodes = [helper.make_node("Unique", ["input"], ["out"], name="uniq", sorted=1)]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None])],
    )
    with pytest.raises(TensorRTLintError) as err:
        check_model(model)
    issue = err.value.report.issues[0]
    assert (issue.node, issue.op_type) == ("uniq", "Unique") and "unsupported" in issue.reason


def test_custom_domain_op_fails():
    nodes = [helper.make_node("MyNms", ["input"], ["out"], name="nms0", domain="com.example")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [5, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, 4])],
        extra_opsets=[helper.make_opsetid("com.example", 1)],
    )
    issues = lint_model(model).issues
    assert [(i.node, i.op_type) for i in issues] == [("nms0", "MyNms")]
    assert "custom domain 'com.example'" in issues[0].reason


def test_string_and_uint8_internal_tensors_fail():
    nodes = [
        helper.make_node("Cast", ["input"], ["u8"], name="to_u8", to=TensorProto.UINT8),
        helper.make_node("Identity", ["u8"], ["u8b"], name="pass_u8"),
        helper.make_node("Cast", ["u8b"], ["out"], name="back", to=TensorProto.FLOAT),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
    )
    issues = lint_model(model).issues
    assert any("UINT8" in i.reason for i in issues)
    # uint8 as the network input, cast straight to float: TensorRT's documented allowance
    ok = _model(
        [helper.make_node("Cast", ["input"], ["out"], name="c", to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("input", TensorProto.UINT8, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
    )
    assert lint_model(ok).ok
    s = _model(
        [helper.make_node("Identity", ["input"], ["out"], name="id_s")],
        [helper.make_tensor_value_info("input", TensorProto.STRING, [4])],
        [helper.make_tensor_value_info("out", TensorProto.STRING, [4])],
    )
    assert any(i.node == "id_s" and "STRING" in i.reason for i in lint_model(s).issues)


def test_per_operator_types_reject_int_conv_data():
    # Add supports INT64; Conv does not: the data (first) input type is checked per operator
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), dtype=np.int64), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["out"], name="int_conv")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.INT64, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, [1, 1, 4, 4])],
        [w],
    )
    issues = lint_model(model).issues
    assert any(i.node == "int_conv" and "INT64" in i.reason and "FP32" in i.reason for i in issues)


def test_restrictions_maxpool_indices_and_resize_mode():
    nodes = [
        helper.make_node("MaxPool", ["input"], ["y", "idx"], name="pool_idx", kernel_shape=[2, 2]),
        helper.make_node("Resize", ["y", "", "scales"], ["out"], name="cubic", mode="cubic"),
    ]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 4, 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1, 2, 2]),
        ],
        [scales],
    )
    reasons = {(i.node, i.reason) for i in lint_model(model).issues}
    assert any(n == "pool_idx" and "Indices" in r for n, r in reasons)
    assert any(n == "cubic" and "'cubic'" in r for n, r in reasons)


def test_opset_outside_range_fails():
    model = _conv_relu()
    model.opset_import[0].version = 25
    assert any("opset 25" in i.reason for i in lint_model(model).issues)


def test_subgraph_nodes_are_checked():
    then_g = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["t"], name="inner_unique")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [None])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="inner_id")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [None])],
    )
    nodes = [helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then_g, else_branch=else_g)]
    model = _model(
        nodes,
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None])],
    )
    issues = lint_model(model).issues
    assert any(i.op_type == "Unique" and "inner_unique" in i.node for i in issues)


def test_cli_lint(tmp_path: Path):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_conv_relu(), good)
    onnx.save(_conv_relu(TensorProto.DOUBLE), bad)
    ok = subprocess.run([sys.executable, "-m", "export", "lint", str(good)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([sys.executable, "-m", "export", "lint", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert fail.returncode == 1 and "conv1" in fail.stderr and "DOUBLE" in fail.stderr
