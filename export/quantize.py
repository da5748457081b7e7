"""FP32 ONNX -> QDQ INT8 ONNX: static activations, per-channel weights, calibrated on real data.

The quantizer is NNCF's post-training quantization of the ONNX graph (min-max ranges plus fast bias
correction). It measured better than onnxruntime.quantization's quantize_static on the same 40
calibration photos for MobileNetV2: top-1 agreement with FP32 on the held-out photos 86.8% vs 64.6%
(MinMax), 66.7% (Percentile 99.99) or 63.9% (asymmetric UINT8 activations); logits correlation 0.990
vs 0.924. `backend="onnxruntime"` keeps ONNX Runtime's quantizer selectable (same format).

The format is the one both CPU runtimes and TensorRT 10 read: QuantizeLinear/DequantizeLinear pairs
around each quantized op (explicit quantization), INT8 weights per output channel, INT8 activations,
both symmetric (zero point 0, which TensorRT requires; NNCF would otherwise pick UINT8 for the
non-negative ReLU6 outputs, a type TensorRT rejects), FP32 biases. Activation ranges come from real
pictures of the model's task (models/data/calibration.py).

What stays FP32, as measured: NNCF quantizes the inputs of the compute ops (Conv, ConvTranspose,
Gemm/MatMul, and the residual Adds its CPU rules allow); Resize, Concat, pooling, softmax, box decoding,
NMS and RoiAlign run on dequantized FP32 tensors. Keeping MobileNetV2's first conv and classifier in
FP32 measured no better (top-1 agreement 63.5% vs 64.6% with onnxruntime's quantizer), and the
detector with its RPN and box heads in INT8 loses 0.005 mAP@0.5 (0.982 -> 0.977), within its gate, so
EXCLUDE_NODES is empty; `exclude=` takes node-name patterns for a model that needs it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

# Ops with INT8 kernels in ONNX Runtime, OpenVINO and TensorRT. Gemm/MatMul cover the classifiers'
# last layer, ConvTranspose the transposed segmenter's decoder.
QUANTIZE_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Node-name patterns kept FP32 per model, where INT8 measured worse than the gate allows (or no faster).
EXCLUDE_NODES: dict[str, tuple[str, ...]] = {}
# Models whose OpenVINO file gets NNCF's fast bias correction: the full one fails on their graph after
# minutes of statistics (the detector: KeyError 'node_conv2d_52' cutting the per-layer subgraphs).
FAST_BIAS_CORRECTION_ONLY: frozenset[str] = frozenset({"shapes_detector"})
CALIBRATION_BATCH = 8
# "tensorrt": signed, zero point 0, fast bias correction; "openvino": unsigned ReLU outputs, full bias correction
FLAVORS: tuple[str, ...] = ("tensorrt", "openvino")


class QuantizationError(RuntimeError):
    """A one-line reason the INT8 model could not be produced (missing data, unreadable ONNX)."""


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    calibration: str  # what the activation ranges were measured on
    calibration_count: int
    quantized_nodes: int
    fp32_nodes: int  # compute ops (QUANTIZE_OP_TYPES) left in FP32

    def to_dict(self) -> dict:
        return {
            "calibration": self.calibration,
            "calibration_images": self.calibration_count,
            "format": "QDQ (per-channel INT8 weights, static INT8 activations, symmetric)",
            "quantized_nodes": self.quantized_nodes,
            "fp32_compute_nodes": self.fp32_nodes,
        }


def _load_checked(path: Path) -> onnx.ModelProto:
    if not Path(path).is_file():
        raise QuantizationError(f"{path}: no such ONNX file (export the FP32 model first)")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(f"{path}: not a valid ONNX model: {first}") from None
    return model


def _excluded(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    return [n.name for n in model.graph.node if any(re.search(p, n.name) for p in patterns)]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a preprocessed array, in small batches."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int) -> None:
        self._batches = iter([{input_name: data[i : i + batch]} for i in range(0, len(data), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_onnx(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    *,
    description: str = "",
    exclude: Sequence[str] = (),
    backend: str = "nncf",
    flavor: str = "tensorrt",
    full_bias_correction: bool = True,
) -> QuantizeResult:
    """Write the QDQ INT8 model of `fp32_path` to `out_path`, calibrated on `calibration` [N, C, H, W].

    `flavor` (NNCF only): "tensorrt", every quantizer signed with zero point 0 and fast bias correction
    (the file TensorRT and ONNX Runtime read; `python -m export engine` builds from it); "openvino",
    NNCF's own unsigned activation quantizers for non-negative tensors and full bias correction: the
    bit the sign would take stays with the range, and OpenVINO runs that file fastest and closest to
    FP32 (README, "INT8 and OpenVINO"). `full_bias_correction=False` keeps the fast one for that flavor
    (FAST_BIAS_CORRECTION_ONLY); where the full one fails anyway, the fast one is used.

    `exclude`: regular expressions of node names kept FP32. QuantizationError names what is wrong
    (no such file, not a valid ONNX model, no calibration data, the quantizer's own failure)."""
    model = _load_checked(Path(fp32_path))
    if calibration is None or len(calibration) == 0:
        raise QuantizationError(
            f"{fp32_path}: no calibration data (static INT8 needs real inputs of the "
            "model's task to measure activation ranges)"
        )
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise QuantizationError(f"{fp32_path}: calibration feeds one image input, the model has {inputs}")
    excluded = _excluded(model, exclude)
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if flavor not in FLAVORS:
            raise ValueError(f"unknown INT8 flavor {flavor!r} ({', '.join(FLAVORS)})")
        if backend == "nncf":
            _quantize_nncf(
                model,
                out_path,
                inputs[0],
                data,
                excluded,
                signed=flavor == "tensorrt",
                full_bias_correction=full_bias_correction,
            )
        elif backend == "onnxruntime":
            _quantize_ort(Path(fp32_path), out_path, inputs[0], data, excluded)
        else:
            raise ValueError(f"unknown quantizer {backend!r} (nncf, onnxruntime)")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(f"{fp32_path}: {backend} quantization failed: {first}") from None
    return _summary(out_path, description or f"{len(data)} inputs", len(data))


def _quantize_nncf(
    model: onnx.ModelProto,
    out_path: Path,
    input_name: str,
    data: np.ndarray,
    excluded: list[str],
    signed: bool = True,
    full_bias_correction: bool = True,
) -> None:
    import nncf

    dataset = nncf.Dataset([data[i : i + 1] for i in range(len(data))], lambda x: {input_name: x})

    def run(fast_bias_correction: bool) -> onnx.ModelProto:
        return nncf.quantize(
            model,
            dataset,
            preset=nncf.QuantizationPreset.PERFORMANCE,  # symmetric weights and activations
            subset_size=len(data),
            fast_bias_correction=fast_bias_correction,
            ignored_scope=nncf.IgnoredScope(names=excluded, validate=False) if excluded else None,
        )

    if signed:
        quantized = signed_activations(run(True))
    elif not full_bias_correction:
        quantized = run(True)
    else:
        try:
            quantized = run(False)
        except KeyError:
            # NNCF's full bias correction cuts the graph into per-layer subgraphs, which fails on the
            # detector's (KeyError 'node_conv2d_52', NNCF 2.x); its fast bias correction still works
            quantized = run(True)
    onnx.save(quantized, str(out_path))


def signed_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite NNCF's unsigned activation quantizers (UINT8, zero point 0, for non-negative tensors
    such as ReLU6 outputs) as signed INT8 ones covering the same range: scale * 255/127, zero point 0.

    TensorRT reads only INT8 with zero point 0; NNCF refuses `signedness_to_force` with its hardware
    configs, so the conversion happens here. It costs the one bit the sign takes (the range [0, max]
    gets 128 levels instead of 256); the gate measures the result.
    """
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        scale_name, zp_name = node.input[1], node.input[2]
        zp = inits.get(zp_name)
        if zp is None or zp.data_type != TensorProto.UINT8 or zp_name in done:
            continue
        zero = numpy_helper.to_array(zp)
        if zero.any():
            raise ValueError(f"{node.name}: asymmetric UINT8 quantizer (zero point {zero.max()}), not convertible")
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
        inits[scale_name].CopyFrom(numpy_helper.from_array(scale * np.float32(255.0 / 127.0), scale_name))
        zp.CopyFrom(numpy_helper.from_array(zero.astype(np.int8), zp_name))
        done.add(zp_name)
    # the quantized tensors between the pairs change type with their zero points
    retyped = {
        o
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in done
        for o in n.output
    }
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if vi.name in retyped:
            vi.type.tensor_type.elem_type = TensorProto.INT8
    # a scale shared by a UINT8 and an INT8 quantizer would be rescaled for both: refuse that graph
    shared = [
        n.name
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        and len(n.input) > 2
        and n.input[2] not in done
        and n.input[1] in {m.input[1] for m in model.graph.node if len(m.input) > 2 and m.input[2] in done}
    ]
    if shared:
        raise ValueError(f"{shared[0]}: a rescaled activation scale is shared with a signed quantizer")
    return model


def _quantize_ort(fp32_path: Path, out_path: Path, input_name: str, data: np.ndarray, excluded: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    reader = _Reader(input_name, data, CALIBRATION_BATCH)
    CalibrationDataReader.register(_Reader)
    quantize_static(
        str(fp32_path),
        str(out_path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(QUANTIZE_OP_TYPES),
        nodes_to_exclude=excluded,
        extra_options={
            "ActivationSymmetric": True,  # zero point 0: what TensorRT's explicit quantization reads
            "WeightSymmetric": True,
            # biases stay FP32: TensorRT dequantizes INT8 only, and folds the bias into the kernel itself
            "QuantizeBias": False,
            "CalibMovingAverage": False,
        },
        calibration_providers=["CPUExecutionProvider"],
    )


def _summary(out_path: Path, description: str, count: int) -> QuantizeResult:
    op_types = QUANTIZE_OP_TYPES
    q = onnx.load(str(out_path))
    dq_outputs = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    compute = [n for n in q.graph.node if n.op_type in op_types]
    quantized = sum(1 for n in compute if any(i in dq_outputs for i in n.input[:1]))
    return QuantizeResult(
        path=out_path,
        calibration=description,
        calibration_count=count,
        quantized_nodes=quantized,
        fp32_nodes=len(compute) - quantized,
    )


def is_qdq(model: onnx.ModelProto) -> bool:
    """True when the graph carries explicit quantization (what TensorRT builds as an INT8 engine)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
