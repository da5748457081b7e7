"""`export --input-dtype uint8`: the served graph takes UINT8 pixels and normalizes them itself.

An FP32 image tensor is 4 bytes per pixel channel on the wire, in every copy and in shared memory;
the pixels it was made from are 1. The exported graph gets a prelude, in front of the unchanged model:

    x (UINT8, same name and shape) -> Cast(FLOAT) -> Mul(a) -> Add(b) -> [Cast(FP16)] -> the model

with a = 1 / (255 std) and b = -mean / std per channel (`invert`: a negated, b = (1 - mean) / std),
i.e. exactly the spec's `(x / 255 [-> 1 - x] - mean) / std` folded into one multiply-add, so clients
and the vision API send the resized pixels (cnncore.preprocess(..., pixels=True)) and nothing else.

`uint8_variant` applies it to whatever ONNX file the pipeline chose to serve (FP32 or INT8) and checks
it against that parent on the same pictures: the two paths differ only in float rounding of the
normalization, so outputs must agree within UINT8_TOLERANCE (of the output's magnitude). The figures go
into parity.json; config.pbtxt (input and warm-up) says TYPE_UINT8.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cnncore.artifacts import file_sha256
from cnncore.preprocess import preprocess
from cnncore.runtime import OrtSettings, ort_session
from cnncore.spec import PreprocessSpec
from export.progress import Step
from export.repository import StagedModel
from protos.model_config_pb2 import DataType

# Largest |uint8 model - parent| over the parent's largest |output|, per output, on the check pictures.
UINT8_TOLERANCE = 1e-3
_CHECK_SIZES = ((640, 480), (300, 500), (224, 224), (97, 131))  # (width, height): crops, stretches, pads


class Uint8InputError(RuntimeError):
    """The model cannot take pixels (no image input) or disagrees with its parent: a one-line reason."""


def add_pixel_input(model: onnx.ModelProto, spec: PreprocessSpec, input_name: str) -> onnx.ModelProto:
    """A copy of `model` whose input `input_name` takes UINT8 pixels [N, C, H, W], normalized in the graph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    vi = next((i for i in g.input if i.name == input_name), None)
    if vi is None:
        raise Uint8InputError(f"the graph has no input {input_name!r}")
    tt = vi.type.tensor_type
    if tt.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(tt.shape.dim) != 4:
        raise Uint8InputError(f"input {input_name!r} is not a float NCHW image tensor")
    channels = tt.shape.dim[1].dim_value
    if channels not in (1, 3) or channels > len(spec.mean) or channels > len(spec.std):
        raise Uint8InputError(
            f"input {input_name!r} has {channels or 'unknown'} channels; the preprocessing "
            f"spec describes {len(spec.mean)}"
        )
    mean = np.asarray(spec.mean[:channels], np.float64)
    std = np.asarray(spec.std[:channels], np.float64)
    sign = -1.0 if spec.invert else 1.0
    scale = (sign / (255.0 * std)).astype(np.float32).reshape(1, channels, 1, 1)
    shift = (((1.0 if spec.invert else 0.0) - mean) / std).astype(np.float32).reshape(1, channels, 1, 1)

    inner = f"{input_name}__normalized"
    for node in g.node:
        for k, name in enumerate(node.input):
            if name == input_name:
                node.input[k] = inner
    pre = f"{input_name}__pixels"
    nodes = [
        helper.make_node("Cast", [input_name], [f"{pre}_f"], to=TensorProto.FLOAT, name=f"{pre}_cast"),
        helper.make_node("Mul", [f"{pre}_f", f"{pre}_scale"], [f"{pre}_scaled"], name=f"{pre}_mul"),
    ]
    if tt.elem_type == TensorProto.FLOAT16:  # an FP16 export: normalize in FP32, hand over in half
        nodes += [
            helper.make_node("Add", [f"{pre}_scaled", f"{pre}_shift"], [f"{pre}_f32"], name=f"{pre}_add"),
            helper.make_node("Cast", [f"{pre}_f32"], [inner], to=TensorProto.FLOAT16, name=f"{pre}_half"),
        ]
    else:
        nodes.append(helper.make_node("Add", [f"{pre}_scaled", f"{pre}_shift"], [inner], name=f"{pre}_add"))
    g.initializer.extend(
        [numpy_helper.from_array(scale, f"{pre}_scale"), numpy_helper.from_array(shift, f"{pre}_shift")]
    )
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)  # the prelude first: nodes stay in topological order
    tt.elem_type = TensorProto.UINT8
    onnx.checker.check_model(out)  # structure only: a quantizer's value_info may not survive full inference
    return out


def _pictures(color: str) -> list[Image.Image]:
    rng = np.random.default_rng(12)
    out = []
    for w, h in _CHECK_SIZES:
        # smooth gradients plus noise: natural-looking pixel statistics, every value 0..255 present
        yy, xx = np.mgrid[0:h, 0:w]
        base = (xx * 255 // max(1, w - 1) + yy * 128 // max(1, h - 1)) % 256
        rgb = (base[..., None] + rng.integers(0, 64, (h, w, 3))).clip(0, 255).astype(np.uint8)
        out.append(Image.fromarray(rgb, "RGB").convert(color))
    return out


def parity_with_parent(parent: Path, pixels_model: Path, spec: PreprocessSpec, input_name: str) -> dict:
    """Both files on the same pictures (parent fed the float preprocessing, the other the pixels)."""
    settings = OrtSettings(intra_op_threads=1)
    a, b = ort_session(parent, settings), ort_session(pixels_model, settings)
    feed_dtype = np.float16 if a.get_inputs()[0].type == "tensor(float16)" else np.float32
    worst: dict[str, float] = {}
    for picture in _pictures(spec.color):
        x, _ = preprocess(picture, spec)
        px, _ = preprocess(picture, spec, pixels=True)
        ya = a.run(None, {input_name: x[None].astype(feed_dtype)})
        yb = b.run(None, {input_name: px[None]})
        for o, ra, rb in zip(a.get_outputs(), ya, yb, strict=True):
            ra, rb = np.asarray(ra, np.float64), np.asarray(rb, np.float64)
            rel = float(np.abs(ra - rb).max() / max(np.abs(ra).max(), 1e-12)) if ra.size else 0.0
            worst[o.name] = max(worst.get(o.name, 0.0), rel)
    return {
        "pictures": len(_CHECK_SIZES),
        "max_relative_difference": worst,
        "tolerance": UINT8_TOLERANCE,
        "ok": all(v <= UINT8_TOLERANCE for v in worst.values()),
    }


def uint8_variant(staged: StagedModel, step: Step | None = None) -> StagedModel:
    """`staged` serving the same model with a UINT8 pixel input, checked against its parent."""
    step = step or (lambda _desc: nullcontext())
    meta, name = staged.meta, staged.name
    with step(f"{name}: UINT8 pixel input (normalization in the graph), parity vs its parent"):
        proto = onnx.load(str(staged.onnx_path))
        try:
            pixels = add_pixel_input(proto, meta.preprocess, meta.input_name)
        except Uint8InputError as exc:
            raise Uint8InputError(f"{name}: --input-dtype uint8: {exc}") from None
        path = staged.onnx_path.with_name(staged.onnx_path.stem + ".uint8.onnx")
        onnx.save(pixels, str(path))
        report = parity_with_parent(staged.onnx_path, path, meta.preprocess, meta.input_name)
        if not report["ok"]:
            raise Uint8InputError(
                f"{name}: --input-dtype uint8 disagrees with its parent: max relative "
                f"difference {report['max_relative_difference']} > {UINT8_TOLERANCE}"
            )
    config = type(staged.config)()
    config.CopyFrom(staged.config)
    for t in config.input:
        if t.name == meta.input_name:
            t.data_type = DataType.TYPE_UINT8
    for sample in config.model_warmup:
        if meta.input_name in sample.inputs:
            sample.inputs[meta.input_name].data_type = DataType.TYPE_UINT8
    parity = {
        **staged.parity,
        "uint8_input": {**report, "parent_sha256": file_sha256(staged.onnx_path), "onnx_sha256": file_sha256(path)},
    }
    meta = staged.meta
    if meta.serving is not None and meta.serving.variants:
        # the kept variant files take float tensors: a server must not switch this model to one of them
        meta = meta.model_copy(update={"serving": meta.serving.model_copy(update={"variants": []})})
    return replace(staged, onnx_path=path, config=config, parity=parity, meta=meta)
