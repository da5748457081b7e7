"""Faster R-CNN components: anchors, box coding, matching, static-shape post-processing, mAP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.detection.anchors import AnchorGenerator
from models.detection.box_coder import BoxCoder, clip_boxes
from models.detection.evaluate import Detections, average_precision, mean_average_precision
from models.detection.matcher import BELOW_LOW, BETWEEN, Matcher
from models.detection.roi_heads import BoxHeadConfig, FastRCNNPredictor, MultiScaleRoIAlign, RoIHeads, TwoMLPHead


def test_anchor_counts_sizes_and_centres() -> None:
    gen = AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    assert gen.num_anchors_per_location() == [3, 3]
    levels = gen((64, 96), [(8, 12), (4, 6)])
    assert [lvl.shape for lvl in levels] == [(8 * 12 * 3, 4), (4 * 6 * 3, 4)]
    a = levels[0]
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    # area ~ size^2 (rounded to whole pixels), ratio = h / w for each of the 3 anchors per location
    np.testing.assert_allclose((w * h).sqrt()[:3].numpy(), [32, 32, 32], rtol=0.03)
    np.testing.assert_allclose((h / w)[:3].numpy(), [0.5, 1.0, 2.0], rtol=0.06)
    # (y, x, anchor) order; centres on the stride grid (stride 8: 64/8 and 96/12)
    centres = torch.stack([(a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2], 1).view(8, 12, 3, 2)
    assert torch.equal(centres[0, 1, 0], torch.tensor([8.0, 0.0]))
    assert torch.equal(centres[2, 0, 2], torch.tensor([0.0, 16.0]))
    assert torch.equal(centres[7, 11, 1], torch.tensor([88.0, 56.0]))
    # torchvision's rounded base anchors for size 32, ratios (0.5, 1, 2)
    expected = torch.tensor([[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]])
    assert torch.equal(AnchorGenerator.base_anchors((32,), (0.5, 1.0, 2.0)), expected)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_encode_decode_round_trip(weights: tuple[float, float, float, float]) -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(100, 2, generator=g) * 200
    ref = torch.cat([ref, ref + 5 + torch.rand(100, 2, generator=g) * 80], 1)
    tgt = torch.rand(100, 2, generator=g) * 200
    tgt = torch.cat([tgt, tgt + 5 + torch.rand(100, 2, generator=g) * 80], 1)
    coder = BoxCoder(weights)
    deltas = coder.encode(tgt, ref)
    torch.testing.assert_close(coder.decode(deltas, ref), tgt, atol=1e-3, rtol=1e-4)
    assert torch.allclose(coder.encode(ref, ref), torch.zeros_like(ref), atol=1e-6)  # identity -> zero deltas


def test_decode_clamps_huge_sizes_and_clip() -> None:
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    box = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert (box[0, 2] - box[0, 0]).item() == pytest.approx(10 * 1000 / 16, rel=1e-4)  # exp capped at log(1000/16)
    clipped = clip_boxes(torch.tensor([[-5.0, -3.0, 300.0, 90.0]]), (100, 200))
    assert clipped.tolist() == [[0.0, 0.0, 200.0, 90.0]]


def test_matcher_thresholds_and_low_quality_matches() -> None:
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.2], [0.1, 0.2, 0.05, 0.25]])
    strict = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou.clone())
    assert strict.tolist() == [0, BETWEEN, BELOW_LOW, BELOW_LOW]
    loose = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou.clone())
    assert loose.tolist() == [0, BETWEEN, BELOW_LOW, 1]  # gt 1's best anchor (0.25) is kept for it


def test_postprocess_static_shapes_padding_and_class_aware_nms() -> None:
    head = RoIHeads(
        MultiScaleRoIAlign(["0"]),
        TwoMLPHead(4 * 49, 8),
        FastRCNNPredictor(8, 3),
        BoxHeadConfig(score_thresh=0.3, nms_thresh=0.5, detections_per_img=5),
    )
    proposals = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [60.0, 60.0, 90.0, 90.0]]] * 2)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    logits = torch.full((6, 3), -10.0)
    logits[0, 1] = logits[1, 1] = 5.0  # two overlapping class-1 boxes -> NMS keeps the better one
    logits[1, 1] = 4.0
    logits[2, 2] = 5.0  # a class-2 box elsewhere
    logits[3:, 0] = 10.0  # image 1: background everywhere ...
    logits[5, 2] = 20.0  # ... except an invalid (padding) proposal, which must not be reported
    out = head.postprocess(logits, torch.zeros(6, 12), proposals, valid, (100, 100))
    assert out["num_detections"].tolist() == [2, 0]
    assert out["boxes"].shape == (2, 5, 4) and out["scores"].shape == (2, 5) and out["labels"].shape == (2, 5)
    assert out["labels"][0, :2].tolist() == [1, 2] or out["labels"][0, :2].tolist() == [2, 1]
    assert out["boxes"][0, 0].tolist() in ([10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0])
    assert (out["scores"][0, 2:] == 0).all() and (out["labels"][1] == 0).all() and (out["boxes"][1] == 0).all()


def test_mean_average_precision() -> None:
    gt = [(np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), np.array([1, 2]))]
    perfect = [Detections(gt[0][0].copy(), np.array([0.9, 0.8], np.float32), np.array([1, 2]))]
    assert mean_average_precision(perfect, gt, 2)["mAP50"] == pytest.approx(1.0)
    wrong_class = [Detections(gt[0][0].copy(), np.array([0.9, 0.8], np.float32), np.array([2, 1]))]
    assert mean_average_precision(wrong_class, gt, 2)["mAP50"] == pytest.approx(0.0)
    shifted = [
        Detections(gt[0][0] + np.array([6, 0, 6, 0], np.float32), np.array([0.9, 0.8], np.float32), np.array([1, 2]))
    ]
    res = mean_average_precision(shifted, gt, 2)  # IoU 4/16 for the small box, 14/26 for the large one
    assert res["AP50_class1"] == 0.0 and res["AP50_class2"] == pytest.approx(1.0)
    # a false positive ranked above the true one halves precision at full recall
    assert average_precision(np.array([0.0, 1.0]), np.array([0.0, 0.5])) == pytest.approx(0.5)


def test_faster_rcnn_takes_its_components_and_defaults_the_rest() -> None:
    """As torchvision's FasterRCNN: the parts given are used as they are, the rest are built to fit."""
    import models  # noqa: F401  (the backbone comes from the registry's MobileNetV2)
    from models.detection.backbone import mobilenet_v2_fpn_backbone
    from models.detection.faster_rcnn import FasterRCNN

    torch.manual_seed(0)
    backbone = mobilenet_v2_fpn_backbone(out_channels=16)
    anchors = AnchorGenerator(((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3)
    pool = MultiScaleRoIAlign(["0", "1", "2"], (5, 5), 2, 64)
    predictor = FastRCNNPredictor(1024, 4)
    model = FasterRCNN(
        backbone, image_size=(128, 128), rpn_anchor_generator=anchors, box_roi_pool=pool, box_predictor=predictor
    ).eval()
    assert model.rpn.anchor_generator is anchors and model.roi_heads.box_roi_pool is pool
    assert model.roi_heads.box_predictor is predictor and model.num_classes == 4
    assert model.rpn.head.cls_logits.out_channels == 3  # default RPN head: 3 anchors per location
    assert (
        model.get_submodule("roi_heads.box_head.fc6").in_features == 16 * 5 * 5
    )  # default box head: backbone x pool size
    with torch.no_grad():
        num, boxes, scores, labels = model(torch.rand(2, 3, 128, 128))
    assert num.shape == (2,) and boxes.shape == (2, 100, 4) and scores.shape == labels.shape == (2, 100)
    with pytest.raises(ValueError, match="exactly one of num_classes"):
        FasterRCNN(backbone)
    with pytest.raises(ValueError, match="exactly one of num_classes"):
        FasterRCNN(backbone, 4, box_predictor=predictor)
