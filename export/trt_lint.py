"""A CPU-only TensorRT compatibility lint for ONNX graphs.

TensorRT is not installable here, yet a graph that TensorRT cannot parse should fail at export time,
not when a GPU machine first builds an engine. The lint checks each node against onnx-tensorrt's
documented operator support matrix (TensorRT 10.x, stored as data in `trt_operators.json` with its
source and version) and each tensor's element type against TensorRT's type rules.

Type policy (the decision the table leaves to us):
- FLOAT, FLOAT16, BFLOAT16, INT32, INT64, BOOL: accepted anywhere. TensorRT 10 lists INT64 as a native
  type for shape and index arithmetic (the dynamo exporter emits INT64 shapes), so it is not an error;
  the per-operator check below still rejects INT64 data flowing into float-only operators (Conv, ...).
- DOUBLE: rejected. TensorRT only casts it down with clamping, which silently changes the numbers that
  parity measured; a float64 tensor in a vision graph is almost always an exporter accident.
- UINT8: only as a graph input or output (TensorRT's rule); Cast may produce or consume it at the
  boundary.
- INT8, INT4, FP8, FP4: quantized types, only between QuantizeLinear and DequantizeLinear.
- STRING, COMPLEX, UINT16/32/64, INT16 and anything else: rejected.
The per-operator "Supported Types" column describes an operator's data tensor, i.e. its first input;
other inputs (shapes, axes, indices) are governed by the global rules above only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import onnx
import onnx.inliner
from onnx import TensorProto, helper

TABLE_PATH = Path(__file__).with_name("trt_operators.json")

# onnx element type -> the spelling used by the onnx-tensorrt table
_TABLE_TYPE_NAME: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.INT8: "INT8",
    TensorProto.INT4: "INT4",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.FLOAT4E2M1: "FP4",
}
_ANYWHERE = {
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.BOOL,
}
_QUANTIZED = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT4E2M1}
_RESIZE_COORD_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST_MODES = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_AXES_MUST_BE_CONSTANT = {
    "Squeeze",
    "Unsqueeze",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
}


@dataclass(frozen=True)
class LintIssue:
    node: str  # node name ("" for graph-level issues such as the opset)
    op_type: str
    reason: str

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op_type})" if self.op_type else (self.node or "graph")
        return f"{where}: {self.reason}"


@dataclass
class LintReport:
    tensorrt_version: str
    opset: int
    node_count: int
    op_types: dict[str, int] = field(default_factory=dict)
    issues: list[LintIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict:
        return {
            "tensorrt_version": self.tensorrt_version,
            "opset": self.opset,
            "node_count": self.node_count,
            "op_types": dict(sorted(self.op_types.items())),
            "issues": [str(i) for i in self.issues],
            "ok": self.ok,
        }


class TensorRTLintError(ValueError):
    """The graph uses something TensorRT 10 does not support; the message names each offending node."""

    def __init__(self, report: LintReport) -> None:
        self.report = report
        lines = "\n  ".join(str(i) for i in report.issues)
        super().__init__(f"TensorRT {report.tensorrt_version} lint failed ({len(report.issues)} issue(s)):\n  {lines}")


@lru_cache(maxsize=1)
def operator_table() -> dict:
    """The stored onnx-tensorrt support matrix (see trt_operators.json for source and version)."""
    return json.loads(TABLE_PATH.read_text())


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else str(elem_type)


def _walk_graph(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node, including those of If/Loop/Scan bodies (TensorRT parses those too)."""
    for node in graph.node:
        yield node, prefix
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_graph(attr.g, f"{prefix}{node.name}/{attr.name}/")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, g in enumerate(attr.graphs):
                    yield from _walk_graph(g, f"{prefix}{node.name}/{attr.name}[{i}]/")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor we can know: I/O, initializers, value_info after inference."""
    types: dict[str, int] = {}

    def add_graph(graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and node.output:
                        types[node.output[0]] = attr.t.data_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    add_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        add_graph(g)

    add_graph(model.graph)
    return types


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}
    return names


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _restriction_issues(node: onnx.NodeProto, constants: set[str], spatial_rank: int | None) -> list[str]:
    """The restrictions from the table's last column that a static look at the node can decide."""
    op, why = node.op_type, []
    if op in ("MaxPool", "AveragePool", "LpPool"):
        dil = _attr(node, "dilations")
        if dil and any(d != 1 for d in dil):
            why.append(f"dilations {list(dil)} are not supported (must be empty or all ones)")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            why.append("the Indices output of MaxPool is not supported")
        kernel = _attr(node, "kernel_shape")
        if op != "LpPool" and kernel is not None and len(kernel) not in (2, 3):
            why.append(f"{len(kernel)}D pooling is not supported (2D or 3D only)")
    elif op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            why.append("sorted must be 1")
    elif op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        coord = _attr(node, "coordinate_transformation_mode", b"half_pixel")
        nearest = _attr(node, "nearest_mode", b"round_prefer_floor")
        mode, coord, nearest = (v.decode() if isinstance(v, bytes) else v for v in (mode, coord, nearest))
        if mode not in ("nearest", "linear"):
            why.append(f"mode {mode!r} is not supported (nearest or linear)")
        if coord not in _RESIZE_COORD_MODES:
            why.append(f"coordinate_transformation_mode {coord!r} is not supported")
        if mode == "nearest" and nearest not in _RESIZE_NEAREST_MODES:
            why.append(f"nearest_mode {nearest!r} is not supported")
        if _attr(node, "antialias", 0):
            why.append("antialiasing is not supported")
        policy = _attr(node, "keep_aspect_ratio_policy", b"stretch")
        policy = policy.decode() if isinstance(policy, bytes) else policy
        if policy != "stretch":
            why.append(f"keep_aspect_ratio_policy {policy!r} is not supported (stretch only)")
    elif op == "ScatterND":
        red = _attr(node, "reduction", b"none")
        red = red.decode() if isinstance(red, bytes) else red
        if red != "none":
            why.append(f"reduction {red!r} is not supported")
    elif op == "Constant":
        for a in node.attribute:
            if a.name in ("sparse_value", "value_string", "value_strings"):
                why.append(f"Constant attribute {a.name} is not supported")
    elif op in _AXES_MUST_BE_CONSTANT:
        # opset >= 13 (Squeeze/Unsqueeze/ReduceSum) and >= 18 (other reductions) pass axes as input 1
        if len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
            why.append(f"axes input {node.input[1]!r} must be an initializer/constant")
    elif op in ("Conv", "ConvTranspose") and spatial_rank is not None and spatial_rank not in (1, 2, 3):
        why.append(f"{spatial_rank}D convolution is not supported")
    elif op == "Dropout" and len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
        why.append("training_mode must be an initializer that evaluates to False")
    return why


def lint_model(model: onnx.ModelProto) -> LintReport:
    """Lint an in-memory model; never raises for lint findings (see `check_model`)."""
    table = operator_table()
    ops: dict = table["operators"]
    if model.functions:
        # TensorRT inlines model-local functions; lint what it will actually see.
        model = onnx.inliner.inline_local_functions(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help for type coverage, not a requirement
        inferred = model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    report = LintReport(tensorrt_version=table["tensorrt_version"], opset=opset, node_count=0)

    if not table["opset_min"] <= opset <= table["opset_max"]:
        report.issues.append(
            LintIssue(
                "graph",
                "",
                f"default-domain opset {opset} is outside TensorRT "
                f"{table['tensorrt_version']}'s range {table['opset_min']}..{table['opset_max']}",
            )
        )

    types = _elem_types(inferred)
    constants = _constant_names(inferred)
    graph_io = {v.name for v in list(inferred.graph.input) + list(inferred.graph.output)}
    producers: dict[str, str] = {}
    consumers: dict[str, set[str]] = {}
    ranks: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    zero_points: set[str] = set()  # QuantizeLinear/DequantizeLinear's third input: INT8 by definition
    for node, _ in _walk_graph(inferred.graph):
        for o in node.output:
            producers[o] = node.op_type
        for i in node.input:
            consumers.setdefault(i, set()).add(node.op_type)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zero_points.add(node.input[2])

    for node, prefix in _walk_graph(inferred.graph):
        report.node_count += 1
        name = prefix + (node.name or f"<unnamed {node.op_type}>")
        report.op_types[node.op_type] = report.op_types.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            report.issues.append(
                LintIssue(
                    name,
                    node.op_type,
                    f"custom domain {node.domain!r}: TensorRT needs a "
                    "plugin for it and none is registered for this repository",
                )
            )
            continue
        entry = ops.get(node.op_type)
        if entry is None:
            report.issues.append(LintIssue(name, node.op_type, "not in TensorRT's supported operator table"))
            continue
        if not entry["supported"]:
            report.issues.append(LintIssue(name, node.op_type, "marked unsupported (N) in TensorRT's operator table"))
            continue
        data = node.input[0] if node.input else ""
        allowed = entry.get("types")
        if data and allowed and data in types:
            t = types[data]
            if _TABLE_TYPE_NAME.get(t) not in allowed:
                report.issues.append(
                    LintIssue(
                        name,
                        node.op_type,
                        f"input {data!r} is {_type_name(t)}; TensorRT "
                        f"supports {node.op_type} on {', '.join(allowed)} only",
                    )
                )
        spatial = ranks[data] - 2 if data in ranks else None
        for why in _restriction_issues(node, constants, spatial):
            report.issues.append(LintIssue(name, node.op_type, why))

    # Element types of every known tensor. Report a bad tensor against the node that produces it (or
    # consumes it, for graph inputs and initializers), so the message points at a node.
    first_user: dict[str, tuple[str, str]] = {}
    for node, prefix in _walk_graph(inferred.graph):
        for used in list(node.input) + list(node.output):
            if used and used not in first_user:
                first_user[used] = (prefix + (node.name or f"<unnamed {node.op_type}>"), node.op_type)
    for tensor, t in sorted(types.items()):
        problem: str | None = None
        if t == TensorProto.DOUBLE:
            problem = "is DOUBLE (float64): TensorRT only casts it down with clamping; export float32"
        elif t == TensorProto.UINT8:
            if tensor not in graph_io and producers.get(tensor) != "Cast" and consumers.get(tensor, set()) - {"Cast"}:
                problem = "is UINT8, which TensorRT supports only as a network input or output"
        elif t in _QUANTIZED:
            if tensor in zero_points:
                nonzero = _nonzero_initializer(inferred.graph, tensor)
                if nonzero:
                    problem = "is a zero point with non-zero values; TensorRT quantization is symmetric (zero point 0)"
            elif producers.get(tensor) != "QuantizeLinear" and not consumers.get(tensor, set()) <= {"DequantizeLinear"}:
                problem = (
                    f"is {_type_name(t)}, a quantized type TensorRT accepts only between "
                    "QuantizeLinear/DequantizeLinear"
                )
        elif t not in _ANYWHERE:
            problem = f"is {_type_name(t)}, which TensorRT does not support"
        if problem:
            where, op = first_user.get(tensor, ("graph", ""))
            report.issues.append(LintIssue(where, op, f"tensor {tensor!r} {problem}"))
    return report


def _nonzero_initializer(graph: onnx.GraphProto, name: str) -> bool:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return bool(numpy_helper.to_array(init).any())
    return False  # not a constant: TensorRT itself would reject it; the op table check reports that


def check_model(model: onnx.ModelProto | str | Path) -> LintReport:
    """Lint `model` (a ModelProto or a path); raise TensorRTLintError naming the offending nodes."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    report = lint_model(model)
    if not report.ok:
        raise TensorRTLintError(report)
    return report


def iter_unsupported_ops() -> Iterable[str]:
    """Operators the stored table marks unsupported (used by tests and `--help` text)."""
    return sorted(k for k, v in operator_table()["operators"].items() if not v["supported"])
