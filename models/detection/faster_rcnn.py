"""Faster R-CNN (torchvision's layout): a GeneralizedRCNN whose parts are given or defaulted.

FasterRCNN takes its components, anchor generator, RPN head, RoI pooler, box head and predictor, like
torchvision's; each one left out is built by the default builder below (torchvision's defaults). The
model builders beside their registry entries pick the parts for one architecture:
`fasterrcnn_resnet50_fpn` (torchvision's, COCO layout) and `fasterrcnn_mobilenet_v2_fpn` (the small CPU
detector the shapes model is trained from, models/detection/shapes_detector.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cnncore.spec import PreprocessSpec, Task
from models.detection import ops
from models.detection.anchors import AnchorGenerator
from models.detection.backbone import BackboneWithFPN, mobilenet_v2_fpn_backbone, resnet50_fpn_backbone
from models.detection.coco_labels import COCO_CATEGORIES
from models.detection.generalized_rcnn import OUTPUT_NAMES, GeneralizedRCNN
from models.detection.parity_check import detection_parity
from models.detection.roi_heads import BoxHeadConfig, FastRCNNPredictor, MultiScaleRoIAlign, RoIHeads, TwoMLPHead
from models.detection.rpn import RegionProposalNetwork, RPNConfig, RPNHead
from models.detection.transform import DetectionTransform
from models.registry import ModelEntry, register

__all__ = ["OUTPUT_NAMES", "FasterRCNN", "fasterrcnn_mobilenet_v2_fpn", "fasterrcnn_resnet50_fpn"]

# ---------------------------------------------------------------- default components (torchvision's)

FPN_FEATMAP_NAMES = ("0", "1", "2", "3")  # the RoI pooler's levels of a ResNet-50 FPN (not "pool")
BOX_REPRESENTATION_SIZE = 1024


def default_anchor_generator(
    sizes: Sequence[Sequence[int]] = ((32,), (64,), (128,), (256,), (512,)),
    aspect_ratios: Sequence[Sequence[float]] | None = None,
) -> AnchorGenerator:
    """One anchor size per FPN level, three aspect ratios at each (torchvision's _default_anchorgen)."""
    return AnchorGenerator(sizes, aspect_ratios or ((0.5, 1.0, 2.0),) * len(sizes))


def default_rpn_head(anchor_generator: AnchorGenerator, in_channels: int, conv_depth: int = 1) -> RPNHead:
    """The RPN head shared by every level, sized for the anchors per location."""
    n_anchors = anchor_generator.num_anchors_per_location()
    if len(set(n_anchors)) != 1:
        raise ValueError("the shared RPN head needs the same number of anchors at every level")
    return RPNHead(in_channels, n_anchors[0], conv_depth)


def default_box_roi_pool(
    featmap_names: Sequence[str] = FPN_FEATMAP_NAMES,
    output_size: tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
    canonical_scale: int = 224,
) -> MultiScaleRoIAlign:
    return MultiScaleRoIAlign(featmap_names, output_size, sampling_ratio, canonical_scale)


def default_box_head(
    in_channels: int, box_roi_pool: MultiScaleRoIAlign, representation_size: int = BOX_REPRESENTATION_SIZE
) -> TwoMLPHead:
    """Two fully connected layers over the pooled features of one box."""
    oh, ow = box_roi_pool.output_size
    return TwoMLPHead(in_channels * oh * ow, representation_size)


def default_box_predictor(num_classes: int, representation_size: int = BOX_REPRESENTATION_SIZE) -> FastRCNNPredictor:
    return FastRCNNPredictor(representation_size, num_classes)


class FasterRCNN(GeneralizedRCNN):
    """Faster R-CNN over a backbone with `out_channels`, at a fixed input size (the server letterboxes).

    num_classes (background included) sizes the default predictor; give either it or box_predictor.
    Parts left None are built with torchvision's defaults, in its order (anchors, RPN head, RoI pooler,
    box head, predictor); the builders below build theirs in that order too, so a seeded random
    initialisation (the training recipes) is the one it always was.
    """

    def __init__(
        self,
        backbone: BackboneWithFPN,
        num_classes: int | None = None,
        image_size: tuple[int, int] = (800, 800),
        *,
        rpn_anchor_generator: AnchorGenerator | None = None,
        rpn_head: RPNHead | None = None,
        rpn_config: RPNConfig | None = None,
        box_roi_pool: MultiScaleRoIAlign | None = None,
        box_head: torch.nn.Module | None = None,
        box_predictor: FastRCNNPredictor | None = None,
        box_config: BoxHeadConfig | None = None,
    ) -> None:
        if (num_classes is None) == (box_predictor is None):
            raise ValueError("give exactly one of num_classes (sizes the default box predictor) or box_predictor")
        out_channels = backbone.out_channels
        # `is None`, not `or`: a container module (nn.Sequential box head) is falsy when empty.
        anchor_generator = default_anchor_generator() if rpn_anchor_generator is None else rpn_anchor_generator
        if rpn_head is None:
            rpn_head = default_rpn_head(anchor_generator, out_channels)
        if box_roi_pool is None:
            box_roi_pool = default_box_roi_pool()
        if box_head is None:
            box_head = default_box_head(out_channels, box_roi_pool)
        if box_predictor is None:
            assert num_classes is not None  # one of the two is given (checked above)
            box_predictor = default_box_predictor(num_classes)
        super().__init__(
            backbone,
            RegionProposalNetwork(anchor_generator, rpn_head, RPNConfig() if rpn_config is None else rpn_config),
            RoIHeads(box_roi_pool, box_head, box_predictor, BoxHeadConfig() if box_config is None else box_config),
            DetectionTransform(image_size),
        )
        self.num_classes = box_predictor.cls_score.out_features


# ---------------------------------------------------------------- ResNet-50 FPN (torchvision's)

# torchvision's fasterrcnn_resnet50_fpn defaults (tests/fixtures/torchvision/detection_hparams.json).
RESNET50_FPN_RPN = RPNConfig(
    pre_nms_top_n_train=2000,
    pre_nms_top_n_test=1000,
    post_nms_top_n_train=2000,
    post_nms_top_n_test=1000,
    nms_thresh=0.7,
    score_thresh=0.0,
    min_size=1e-3,
    fg_iou_thresh=0.7,
    bg_iou_thresh=0.3,
    batch_size_per_image=256,
    positive_fraction=0.5,
)
RESNET50_FPN_BOX = BoxHeadConfig(
    score_thresh=0.05,
    nms_thresh=0.5,
    detections_per_img=100,
    fg_iou_thresh=0.5,
    bg_iou_thresh=0.5,
    batch_size_per_image=512,
    positive_fraction=0.25,
    box_coder_weights=(10.0, 10.0, 5.0, 5.0),
)
RESNET50_FPN_INPUT = (800, 800)
RESNET50_FPN_PREPROCESS = PreprocessSpec(input_size=RESNET50_FPN_INPUT, resize="letterbox", pad_value=0.0)


def fasterrcnn_resnet50_fpn(
    num_classes: int = 91,
    image_size: tuple[int, int] = RESNET50_FPN_INPUT,
    frozen_bn: bool = False,
    pretrained_backbone: bool = False,
    rpn_config: RPNConfig = RESNET50_FPN_RPN,
    box_config: BoxHeadConfig = RESNET50_FPN_BOX,
) -> FasterRCNN:
    """Keys and shapes of torchvision's fasterrcnn_resnet50_fpn (frozen_bn=True: its pretrained layout)."""
    backbone = resnet50_fpn_backbone(frozen_bn=frozen_bn, pretrained=pretrained_backbone)
    return FasterRCNN(backbone, num_classes, image_size, rpn_config=rpn_config, box_config=box_config)


def resnet50_example_inputs(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    # Noise pictures only. A blank picture through this random-init network gives many detections with
    # bit-identical scores (a translation-equivariant net on a constant input): boxes one anchor stride
    # apart, between which NMS may keep either, and ONNX Runtime's NonMaxSuppression breaks such exact
    # ties differently from the eager reference. Blank pictures are checked on the trained detector,
    # where they give no detections (shapes_detector.shapes_example_inputs).
    return torch.rand((n, 3, *RESNET50_FPN_INPUT), generator=g)


register(
    ModelEntry(
        name="fasterrcnn_resnet50_fpn",
        builder=fasterrcnn_resnet50_fpn,
        task=Task.detection,
        input_shape=(3, *RESNET50_FPN_INPUT),
        preprocess=RESNET50_FPN_PREPROCESS,
        labels=lambda: COCO_CATEGORIES,
        weights=None,
        served_by_default=False,
        description="Faster R-CNN ResNet-50 FPN, torchvision layout (FrozenBatchNorm2d, pretrained-checkpoint "
        "keys): pass a torchvision COCO checkpoint as weights",
        output_names=OUTPUT_NAMES,
        builder_kwargs={"image_size": RESNET50_FPN_INPUT, "frozen_bn": True},
        onnx_translation_table=ops.onnx_translation_table,
        example_inputs=resnet50_example_inputs,
        parity_check=detection_parity,
        max_batch_size=8,
    )
)

# ---------------------------------------------------------------- MobileNetV2 FPN (small, for CPU training)

# Shapes of 30-110 px in a 256x256 input.
SHAPES_IMAGE_SIZE = (256, 256)
SHAPES_RPN = RPNConfig(
    pre_nms_top_n_train=300,
    pre_nms_top_n_test=300,
    post_nms_top_n_train=150,
    post_nms_top_n_test=100,
    nms_thresh=0.7,
    score_thresh=0.0,
    min_size=1e-3,
    fg_iou_thresh=0.7,
    bg_iou_thresh=0.3,
    batch_size_per_image=128,
    positive_fraction=0.5,
)
SHAPES_BOX = BoxHeadConfig(
    score_thresh=0.05,
    nms_thresh=0.5,
    detections_per_img=20,
    fg_iou_thresh=0.5,
    bg_iou_thresh=0.5,
    batch_size_per_image=64,
    positive_fraction=0.25,
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
    anchors = default_anchor_generator(sizes=((32,), (64,), (128,)))
    rpn_head = default_rpn_head(anchors, backbone.out_channels)
    # Boxes of ~64 px pool from the stride-16 level, ~32 px from stride 8, ~128 px from stride 32.
    pool = default_box_roi_pool(featmap_names=("0", "1", "2"), canonical_scale=64)
    box_head = default_box_head(backbone.out_channels, pool, representation_size)
    return FasterRCNN(
        backbone,
        image_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_config=rpn_config,
        box_roi_pool=pool,
        box_head=box_head,
        box_predictor=default_box_predictor(num_classes, representation_size),
        box_config=box_config,
    )
