"""NMS and RoIAlign: the eager references against ONNX Runtime's own NonMaxSuppression / RoiAlign
(one-node graphs built with onnx.helper), RoIAlign's aligned semantics, and the ONNX translations."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from models.detection import ops


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _random_boxes(rng: np.random.Generator, shape: tuple[int, ...], extent: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, extent, size=(*shape, 2))
    wh = rng.uniform(1, extent / 3, size=(*shape, 2))
    return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def _ort_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, score_thr: float) -> np.ndarray:
    """ONNX Runtime NonMaxSuppression (one class) -> keep mask [B,S]."""
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "thr"], ["selected"])
    graph = helper.make_graph(
        [node],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, list(boxes.shape)),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [boxes.shape[0], 1, boxes.shape[1]]),
            helper.make_tensor_value_info("max", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("thr", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (selected,) = _session(model).run(
        None,
        {
            "boxes": boxes,
            "scores": scores[:, None, :],
            "max": np.array([boxes.shape[1]], np.int64),
            "iou": np.array([iou], np.float32),
            "thr": np.array([score_thr], np.float32),
        },
    )
    keep = np.zeros(scores.shape, dtype=bool)
    keep[selected[:, 0], selected[:, 2]] = True
    return keep


@pytest.mark.parametrize("iou,score_thr", [(0.5, 0.0), (0.7, 0.3), (0.3, -1.0)])
def test_nms_reference_matches_onnxruntime(iou: float, score_thr: float) -> None:
    rng = np.random.default_rng(int(iou * 100))
    boxes = _random_boxes(rng, (3, 200))
    scores = rng.uniform(0, 1, size=(3, 200)).astype(np.float32)
    scores[1, :50] = -1.0  # the "invalid candidate" marker the detector uses
    ours = ops.nms_mask(torch.from_numpy(boxes), torch.from_numpy(scores), iou, score_thr).numpy()
    np.testing.assert_array_equal(ours, _ort_nms(boxes, scores, iou, score_thr))
    assert 0 < ours.sum() < ours.size  # the check is not vacuous: some kept, some suppressed


def _ort_roi_align(
    features: np.ndarray, rois: np.ndarray, scale: float, out: int, sr: int, aligned: bool
) -> np.ndarray:
    node = helper.make_node(
        "RoiAlign",
        ["x", "rois", "batch_indices"],
        ["y"],
        mode="avg",
        output_height=out,
        output_width=out,
        sampling_ratio=sr,
        spatial_scale=scale,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
    )
    flat = rois.reshape(-1, 4)
    graph = helper.make_graph(
        [node],
        "roi_align",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(features.shape)),
            helper.make_tensor_value_info("rois", TensorProto.FLOAT, list(flat.shape)),
            helper.make_tensor_value_info("batch_indices", TensorProto.INT64, [flat.shape[0]]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    batch_indices = np.repeat(np.arange(rois.shape[0]), rois.shape[1]).astype(np.int64)
    (y,) = _session(model).run(None, {"x": features, "rois": flat, "batch_indices": batch_indices})
    return y.reshape(rois.shape[0], rois.shape[1], *y.shape[1:])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("scale,sr", [(0.25, 2), (0.125, 3), (1.0, 1)])
def test_roi_align_reference_matches_onnxruntime(aligned: bool, scale: float, sr: int) -> None:
    rng = np.random.default_rng(sr)
    features = rng.normal(size=(2, 5, 13, 17)).astype(np.float32)
    extent = 17 / scale
    rois = _random_boxes(rng, (2, 30), extent)
    rois[0, 0] = (-8, -8, 4, 4)  # partly outside the map: the clamping / zeroing rules matter
    rois[0, 1] = (extent - 5, 3, extent + 9, 9)
    rois[1, 0] = (5, 5, 5.2, 5.1)  # tiny: aligned=False clamps the size to 1 feature pixel
    ours = ops.roi_align_reference(torch.from_numpy(features), torch.from_numpy(rois), scale, 7, 7, sr, aligned).numpy()
    np.testing.assert_allclose(ours, _ort_roi_align(features, rois, scale, 7, sr, aligned), atol=1e-5, rtol=1e-5)


def test_roi_align_aligned_semantics() -> None:
    """aligned=True: box coordinates are continuous, pixel i covers [i, i+1), so its centre is i + 0.5."""
    width = 8
    ramp = torch.arange(width, dtype=torch.float32).expand(1, 1, width, width).contiguous()  # value = x index
    box = torch.tensor([[[0.0, 0.0, 4.0, 4.0]]])
    # Two samples per axis at x = 1 and 3 (continuous) -> pixel indices 0.5 and 2.5 -> mean 1.5.
    aligned = ops.roi_align_reference(ramp, box, 1.0, 1, 1, 2, aligned=True)
    legacy = ops.roi_align_reference(ramp, box, 1.0, 1, 1, 2, aligned=False)
    assert aligned.item() == pytest.approx(1.5)
    assert legacy.item() == pytest.approx(2.0)  # legacy mode treats coordinates as pixel indices


def test_roi_align_op_and_reference_agree_and_reference_is_differentiable() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 4, 10, 10, requires_grad=True)
    rois = torch.tensor([[[1.0, 1.0, 30.0, 20.0], [0.0, 0.0, 39.0, 39.0]]] * 2)
    grad_path = ops.roi_align(features, rois, 0.25, (7, 7), 2, False)  # reference (needs grad)
    grad_path.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    with torch.no_grad():
        op_path = ops.roi_align(features, rois, 0.25, (7, 7), 2, False)  # the custom op
    torch.testing.assert_close(op_path, grad_path.detach())


class _OpsModule(torch.nn.Module):
    def forward(self, features: torch.Tensor, rois: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor):
        return ops.nms_mask(boxes, scores, 0.5, 0.1), ops.roi_align(features, rois, 0.25, (7, 7), 2, True)


def test_translations_export_to_native_onnx_ops(tmp_path) -> None:
    rng = np.random.default_rng(0)
    args = (
        torch.from_numpy(rng.normal(size=(2, 8, 16, 20)).astype(np.float32)),
        torch.from_numpy(_random_boxes(rng, (2, 5), 60)),
        torch.from_numpy(_random_boxes(rng, (2, 50), 50)),
        torch.from_numpy(rng.uniform(size=(2, 50)).astype(np.float32)),
    )
    batch = torch.export.Dim("batch", min=1, max=8)
    path = tmp_path / "ops.onnx"
    torch.onnx.export(
        _OpsModule().eval(),
        args,
        str(path),
        dynamo=True,
        custom_translation_table=ops.onnx_translation_table(),
        input_names=["features", "rois", "boxes", "scores"],
        dynamic_shapes=({0: batch},) * 4,
        external_data=False,
    )
    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"NonMaxSuppression", "RoiAlign"} <= op_types
    session = _session(onnx.load(str(path)))
    for n in (1, 2):  # dynamic batch
        feed = dict(zip(["features", "rois", "boxes", "scores"], (a[:n].numpy() for a in args), strict=True))
        keep, pooled = session.run(None, feed)
        ref_keep, ref_pooled = _OpsModule()(*(a[:n] for a in args))
        np.testing.assert_array_equal(keep, ref_keep.numpy())
        np.testing.assert_allclose(pooled, ref_pooled.numpy(), atol=1e-5)
