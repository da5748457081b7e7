"""Tiny torch-free ONNX models whose right answers are known, in a model repository, for vision tests.

They exercise the whole vision path (decode, preprocessing spec, batcher, postprocessing, per-image
errors, task checks) in seconds, independently of the trained models:
- colour_classifier: logits = 10 x the mean of each RGB channel -> labels red / green / blue;
- bright_segmenter:  a 1x1 convolution, class 1 where a pixel is brighter than mid-grey;
- box_detector:      "detects" one fixed box (the middle quarter of its letterboxed input), score 0.9;
- grey_autoencoder / grey_encoder: latent = mean brightness, reconstruction = the input itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cnncore.config import write_config
from cnncore.spec import ModelMeta, PreprocessSpec, Task
from protos import model_config_pb2 as mc

_FLOAT, _INT64 = TensorProto.FLOAT, TensorProto.INT64
_CONFIG_TYPE: dict[int, mc.DataType] = {_FLOAT: mc.TYPE_FP32, _INT64: mc.TYPE_INT64}


def _write_model(
    repo: Path,
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list[int]]],
    outputs: Sequence[tuple[str, int, list[int]]],
    meta: ModelMeta,
    initializers: Sequence[tuple[str, np.ndarray]] = (),
) -> None:
    inits = [numpy_helper.from_array(arr, n) for n, arr in initializers]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, _FLOAT, ["N", *d]) for n, d in inputs],
        [helper.make_tensor_value_info(n, t, ["N", *d]) for n, t, d in outputs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(model_dir / "1" / "model.onnx"))
    cfg = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=8)
    for n, d in inputs:
        cfg.input.add(name=n, data_type=mc.TYPE_FP32, dims=d)
    for n, t, d in outputs:
        cfg.output.add(name=n, data_type=_CONFIG_TYPE[t], dims=d)
    cfg.dynamic_batching.max_queue_delay_microseconds = 2000
    write_config(cfg, model_dir)
    meta.write(model_dir)


def build_synthetic_repository(repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    rgb8 = PreprocessSpec(input_size=(8, 8), resize="stretch")
    _write_model(
        repo,
        "colour_classifier",
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        [("input", [3, 8, 8])],
        [("logits", _FLOAT, [3])],
        ModelMeta(name="colour_classifier", task=Task.classification, preprocess=rgb8, labels=["red", "green", "blue"]),
        [("w", np.eye(3, dtype=np.float32) * 10)],
    )
    weight = np.array([[-1, -1, -1], [1, 1, 1]], np.float32).reshape(2, 3, 1, 1) / 3
    _write_model(
        repo,
        "bright_segmenter",
        [helper.make_node("Conv", ["input", "w", "b"], ["logits"])],
        [("input", [3, 32, 32])],
        [("logits", _FLOAT, [2, 32, 32])],
        ModelMeta(
            name="bright_segmenter",
            task=Task.segmentation,
            preprocess=PreprocessSpec(input_size=(32, 32), resize="stretch"),
            labels=["background", "bright"],
        ),
        [("w", weight), ("b", np.array([0.5, -0.5], np.float32))],
    )
    # One padded detection row per image plus one padding row: shape [N, 2, 4]; num_detections = 1.
    box = np.array([[[16, 16, 48, 48], [0, 0, 1, 1]]], np.float32)
    _write_model(
        repo,
        "box_detector",
        [
            helper.make_node("Shape", ["input"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
            helper.make_node("Concat", ["n", "two", "four"], ["rep3"], axis=0),
            helper.make_node("Expand", ["box", "rep3"], ["boxes"]),
            helper.make_node("Concat", ["n", "two"], ["rep2"], axis=0),
            helper.make_node("Expand", ["score", "rep2"], ["scores"]),
            helper.make_node("Expand", ["label", "rep2"], ["labels"]),
            helper.make_node("Expand", ["one_det", "n"], ["num_detections"]),
        ],
        [("input", [3, 64, 64])],
        [("num_detections", _INT64, []), ("boxes", _FLOAT, [2, 4]), ("scores", _FLOAT, [2]), ("labels", _INT64, [2])],
        ModelMeta(
            name="box_detector",
            task=Task.detection,
            preprocess=PreprocessSpec(input_size=(64, 64), resize="letterbox"),
            labels=["background", "thing"],
        ),
        [
            ("zero", np.array([0], np.int64)),
            ("one", np.array([1], np.int64)),
            ("two", np.array([2], np.int64)),
            ("four", np.array([4], np.int64)),
            ("box", box),
            ("score", np.array([[0.9, 0.1]], np.float32)),
            ("label", np.array([[1, 1]], np.int64)),
            ("one_det", np.array([1], np.int64)),
        ],
    )
    grey8 = PreprocessSpec(input_size=(8, 8), color="L", resize="stretch", mean=(0.5,), std=(0.5,))
    for name, task in (("grey_autoencoder", Task.autoencoder), ("grey_encoder", Task.encoder)):
        outputs = [("latent", _FLOAT, [1])] + (
            [("reconstruction", _FLOAT, [1, 8, 8])] if task == Task.autoencoder else []
        )
        nodes = [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["latent"]),
        ]
        if task == Task.autoencoder:
            nodes.append(helper.make_node("Identity", ["input"], ["reconstruction"]))
        _write_model(
            repo, name, nodes, [("input", [1, 8, 8])], outputs, ModelMeta(name=name, task=task, preprocess=grey8)
        )
    return repo
