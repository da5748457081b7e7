"""Faster R-CNN, the generalized R-CNN tying transform, backbone, RPN and RoI heads together.

Training: model.train(); model(images, targets) -> dict of losses.
Inference / export: model.eval(); model(images) -> (num_detections [N], boxes [N,K,4],
scores [N,K], labels [N,K]), static shapes except the batch, boxes in input pixels.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models.detection.anchors import AnchorGenerator
from models.detection.backbone import BackboneWithFPN, mobilenet_v2_fpn_backbone, resnet50_fpn_backbone
from models.detection.roi_heads import BoxHeadConfig, FastRCNNPredictor, MultiScaleRoIAlign, RoIHeads, TwoMLPHead
from models.detection.rpn import RegionProposalNetwork, RPNConfig, RPNHead
from models.detection.transform import DetectionTransform

OUTPUT_NAMES = ("num_detections", "boxes", "scores", "labels")

# torchvision's fasterrcnn_resnet50_fpn defaults (tests/fixtures/torchvision/detection_hparams.json).
RESNET50_FPN_RPN = RPNConfig(
    pre_nms_top_n_train=2000, pre_nms_top_n_test=1000, post_nms_top_n_train=2000, post_nms_top_n_test=1000,
    nms_thresh=0.7, score_thresh=0.0, min_size=1e-3, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
    batch_size_per_image=256, positive_fraction=0.5,
)
RESNET50_FPN_BOX = BoxHeadConfig(
    score_thresh=0.05, nms_thresh=0.5, detections_per_img=100, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
    batch_size_per_image=512, positive_fraction=0.25, box_coder_weights=(10.0, 10.0, 5.0, 5.0),
)


class FasterRCNN(nn.Module):
    def __init__(
        self,
        backbone: BackboneWithFPN,
        num_classes: int,
        image_size: tuple[int, int],
        anchor_sizes: Sequence[Sequence[int]],
        aspect_ratios: Sequence[Sequence[float]],
        rpn_config: RPNConfig,
        box_config: BoxHeadConfig,
        roi_featmap_names: Sequence[str],
        representation_size: int = 1024,
        roi_output_size: tuple[int, int] = (7, 7),
        roi_sampling_ratio: int = 2,
        roi_canonical_scale: int = 224,
        rpn_conv_depth: int = 1,
    ) -> None:
        super().__init__()
        self.transform = DetectionTransform(image_size)
        self.backbone = backbone
        anchors = AnchorGenerator(anchor_sizes, aspect_ratios)
        n_anchors = anchors.num_anchors_per_location()
        if len(set(n_anchors)) != 1:
            raise ValueError("the shared RPN head needs the same number of anchors at every level")
        self.rpn = RegionProposalNetwork(anchors, RPNHead(backbone.out_channels, n_anchors[0], rpn_conv_depth), rpn_config)
        pool = MultiScaleRoIAlign(roi_featmap_names, roi_output_size, roi_sampling_ratio, roi_canonical_scale)
        in_features = backbone.out_channels * roi_output_size[0] * roi_output_size[1]
        self.roi_heads = RoIHeads(
            pool, TwoMLPHead(in_features, representation_size), FastRCNNPredictor(representation_size, num_classes), box_config
        )
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_classes = num_classes

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None):  # type: ignore[no-untyped-def]
        if self.training and targets is None:
            raise ValueError("training needs targets (list of {'boxes': [n,4], 'labels': [n]})")
        return self.forward_features(self.backbone(self.transform(images)), targets)

    def forward_features(self, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None):  # type: ignore[no-untyped-def]
        """Everything after the backbone (the CPU training recipe feeds cached backbone features here)."""
        feats = list(features.values())
        proposals, valid, rpn_losses = self.rpn(feats, self.image_size, targets if self.training else None)
        detections, head_losses = self.roi_heads(features, proposals, valid, self.image_size, targets if self.training else None)
        if self.training:
            return {**rpn_losses, **head_losses}
        return tuple(detections[name] for name in OUTPUT_NAMES)


def fasterrcnn_resnet50_fpn(
    num_classes: int = 91,
    image_size: tuple[int, int] = (800, 800),
    frozen_bn: bool = False,
    pretrained_backbone: bool = False,
    rpn_config: RPNConfig = RESNET50_FPN_RPN,
    box_config: BoxHeadConfig = RESNET50_FPN_BOX,
) -> FasterRCNN:
    """Keys and shapes of torchvision's fasterrcnn_resnet50_fpn (frozen_bn=True: its pretrained layout)."""
    backbone = resnet50_fpn_backbone(frozen_bn=frozen_bn, pretrained=pretrained_backbone)
    return FasterRCNN(
        backbone,
        num_classes,
        image_size,
        anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios=((0.5, 1.0, 2.0),) * 5,
        rpn_config=rpn_config,
        box_config=box_config,
        roi_featmap_names=("0", "1", "2", "3"),
        representation_size=1024,
    )


# The shipped CPU detector: shapes of 30-110 px in a 256x256 input.
SHAPES_IMAGE_SIZE = (256, 256)
SHAPES_RPN = RPNConfig(
    pre_nms_top_n_train=300, pre_nms_top_n_test=300, post_nms_top_n_train=150, post_nms_top_n_test=100,
    nms_thresh=0.7, score_thresh=0.0, min_size=1e-3, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
    batch_size_per_image=128, positive_fraction=0.5,
)
SHAPES_BOX = BoxHeadConfig(
    score_thresh=0.05, nms_thresh=0.5, detections_per_img=20, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
    batch_size_per_image=64, positive_fraction=0.25,
)


def fasterrcnn_mobilenet_v2_fpn(
    num_classes: int,
    image_size: tuple[int, int] = SHAPES_IMAGE_SIZE,
    pretrained_backbone: bool = False,
    fpn_channels: int = 64,
    representation_size: int = 256,
    rpn_config: RPNConfig = SHAPES_RPN,
    box_config: BoxHeadConfig = SHAPES_BOX,
) -> FasterRCNN:
    """MobileNetV2 (zoo, ImageNet weights when pretrained_backbone) + 3-level light FPN, small box head."""
    backbone = mobilenet_v2_fpn_backbone(out_channels=fpn_channels, pretrained=pretrained_backbone)
    return FasterRCNN(
        backbone,
        num_classes,
        image_size,
        anchor_sizes=((32,), (64,), (128,)),
        aspect_ratios=((0.5, 1.0, 2.0),) * 3,
        rpn_config=rpn_config,
        box_config=box_config,
        roi_featmap_names=("0", "1", "2"),
        representation_size=representation_size,
        # Boxes of ~64 px pool from the stride-16 level, ~32 px from stride 8, ~128 px from stride 32.
        roi_canonical_scale=64,
    )
