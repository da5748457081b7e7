"""ResNet-50 + FPN Faster R-CNN against torchvision's state-dict layouts (tests/fixtures/torchvision):
keys, shapes and order for the BatchNorm2d builder and the pretrained (FrozenBatchNorm2d) checkpoint
layout, hyper-parameters, and that a checkpoint of the pretrained layout loads strictly and exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models  # noqa: F401  (registers the families)
from models.detection.faster_rcnn import RESNET50_FPN_BOX, RESNET50_FPN_RPN, fasterrcnn_resnet50_fpn
from models.detection.roi_heads import BoxHeadConfig
from models.detection.rpn import RPNConfig
from models.registry import get_entry, get_model

FIXTURES = Path(__file__).parent / "fixtures" / "torchvision"


def _layout(name: str) -> list[tuple[str, list[int]]]:
    data = json.loads((FIXTURES / name).read_text())
    return [(k, shape) for k, shape, _ in data["state_dict"]]


def _ours(model: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def test_batchnorm_layout_matches_torchvision_builder() -> None:
    model = fasterrcnn_resnet50_fpn(frozen_bn=False)
    assert _ours(model) == _layout("fasterrcnn_resnet50_fpn.json")
    expected = json.loads((FIXTURES / "fasterrcnn_resnet50_fpn.json").read_text())["num_params"]
    assert sum(p.numel() for p in model.parameters()) == expected


def test_pretrained_layout_matches_torchvision_checkpoints() -> None:
    model = fasterrcnn_resnet50_fpn(frozen_bn=True)
    layout = _layout("fasterrcnn_resnet50_fpn_pretrained_layout.json")
    assert len(layout) == 295
    assert _ours(model) == layout


def test_default_hyperparameters_match_torchvision() -> None:
    hp = json.loads((FIXTURES / "detection_hparams.json").read_text())["fasterrcnn_resnet50_fpn"]
    model = fasterrcnn_resnet50_fpn()
    anchors = model.rpn.anchor_generator
    assert [list(s) for s in anchors.sizes] == hp["anchor_sizes"]
    assert [list(a) for a in anchors.aspect_ratios] == hp["anchor_aspect_ratios"]
    rpn: RPNConfig = RESNET50_FPN_RPN
    assert (rpn.pre_nms_top_n_train, rpn.pre_nms_top_n_test) == (
        hp["rpn_pre_nms_top_n"]["training"],
        hp["rpn_pre_nms_top_n"]["testing"],
    )
    assert (rpn.post_nms_top_n_train, rpn.post_nms_top_n_test) == (
        hp["rpn_post_nms_top_n"]["training"],
        hp["rpn_post_nms_top_n"]["testing"],
    )
    assert (rpn.nms_thresh, rpn.score_thresh, rpn.min_size) == (
        hp["rpn_nms_thresh"],
        hp["rpn_score_thresh"],
        hp["rpn_min_box_size"],
    )
    assert (rpn.fg_iou_thresh, rpn.bg_iou_thresh) == (hp["rpn_fg_iou_thresh"], hp["rpn_bg_iou_thresh"])
    assert (rpn.batch_size_per_image, rpn.positive_fraction) == (
        hp["rpn_batch_size_per_image"],
        hp["rpn_positive_fraction"],
    )
    box: BoxHeadConfig = RESNET50_FPN_BOX
    assert (box.score_thresh, box.nms_thresh, box.detections_per_img) == (
        hp["box_score_thresh"],
        hp["box_nms_thresh"],
        hp["box_detections_per_img"],
    )
    assert (box.fg_iou_thresh, box.bg_iou_thresh) == (hp["box_fg_iou_thresh"], hp["box_bg_iou_thresh"])
    assert (box.batch_size_per_image, box.positive_fraction) == (
        hp["box_batch_size_per_image"],
        hp["box_positive_fraction"],
    )
    assert list(box.box_coder_weights) == hp["box_coder_weights"]
    assert model.rpn.box_coder.weights == tuple(hp["rpn_box_coder_weights"])
    assert model.roi_heads.box_coder.bbox_xform_clip == pytest.approx(hp["bbox_xform_clip"])
    pool = model.roi_heads.box_roi_pool
    assert list(pool.output_size) == hp["roi_pool_output_size"] and pool.sampling_ratio == hp["roi_pool_sampling_ratio"]
    assert pool.featmap_names == hp["roi_pool_featmaps_used"]
    assert (pool.canonical_scale, pool.canonical_level) == (
        hp["roi_pool_canonical_scale"],
        hp["roi_pool_canonical_level"],
    )
    assert model.get_submodule("roi_heads.box_head.fc6").out_features == hp["box_head_representation_size"]
    assert model.num_classes == hp["num_classes"]
    assert model.transform.mean.flatten().tolist() == pytest.approx(hp["transform_image_mean"])
    assert model.transform.std.flatten().tolist() == pytest.approx(hp["transform_image_std"])
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 64, 64))
    assert list(feats) == hp["backbone_feature_names"]


@pytest.mark.slow
def test_pretrained_layout_checkpoint_loads_strict_and_exports(tmp_path: Path) -> None:
    """A user's COCO checkpoint (here: random tensors of exactly that layout) through get_model and export."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in _layout("fasterrcnn_resnet50_fpn_pretrained_layout.json"):
        t = torch.rand(shape, generator=g) * 0.02 - 0.01
        if key.endswith("running_var"):
            t = t.abs() + 1.0
        state[key] = t
    ckpt = tmp_path / "coco.pth"
    torch.save(state, ckpt)
    model = get_model("fasterrcnn_resnet50_fpn", weights=ckpt)  # strict=True inside
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

    # Export a small-input, few-proposal variant of the same architecture (the 800x800 default is
    # heavy for CI CPUs); the graph is the same apart from constants. With near-zero random weights
    # every class scores ~1/91 < 0.05, so parity here is about the graph running, not the ranking
    # (the trained shipped detector's export test covers detections).
    entry = get_entry("fasterrcnn_resnet50_fpn")
    assert entry.onnx_translation_table is not None and entry.parity_check is not None
    small = fasterrcnn_resnet50_fpn(
        image_size=(192, 192),
        frozen_bn=True,
        rpn_config=RPNConfig(pre_nms_top_n_test=100, post_nms_top_n_test=50),
        box_config=BoxHeadConfig(detections_per_img=10),
    )
    small.load_state_dict(state, strict=True)
    small.eval()
    x = torch.rand(2, 3, 192, 192, generator=g)
    x[1] = 0
    path = tmp_path / "frcnn.onnx"
    torch.onnx.export(
        small,
        (x,),
        str(path),
        dynamo=True,
        custom_translation_table=entry.onnx_translation_table(),
        input_names=["input"],
        output_names=list(entry.output_names),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},),
        external_data=False,
    )
    import onnx
    import onnxruntime as ort

    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"NonMaxSuppression", "RoiAlign"} <= op_types
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(entry.output_names, session.run(None, {"input": x.numpy()}), strict=True))
    with torch.no_grad():
        ref = dict(zip(entry.output_names, (o.numpy() for o in small(x)), strict=True))
    assert got["boxes"].shape == (2, 10, 4)
    report = entry.parity_check(ref, got)
    assert report["ok"]
    assert np.array_equal(got["num_detections"], ref["num_detections"])
