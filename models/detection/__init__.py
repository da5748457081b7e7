"""Faster R-CNN family, split as torchvision's detection package.

- generalized_rcnn.py: the glue (transform -> backbone -> RPN -> RoI heads)
- faster_rcnn.py: FasterRCNN from its components (defaulted by builders), the model builders and the
  `fasterrcnn_resnet50_fpn` registry entry: torchvision's architecture and state-dict layout (COCO, 91
  classes), architecture only: `get_model("fasterrcnn_resnet50_fpn", weights="coco.pth")` loads a
  user's torchvision checkpoint (pretrained layout, FrozenBatchNorm2d) with strict=True
- shapes_detector.py: `shapes_detector` (served by default), MobileNetV2 (ImageNet) + light FPN trained
  on the synthetic shapes data, with its weights, labels, preprocessing and registry entry
- anchors, rpn, roi_heads, backbone, transform, box_coder, matcher: the components; ops: the
  export-friendly NMS / RoIAlign custom ops; parity: the detections comparison used at export

Label index i of a detector's output names labels()[i]; index 0 is "__background__" and never appears
in a detection (padding rows past num_detections carry label 0, score 0 and a zero box).
"""

from __future__ import annotations

# Importing the builder modules registers their entries.
from models.detection.faster_rcnn import (
    OUTPUT_NAMES,
    FasterRCNN,
    fasterrcnn_mobilenet_v2_fpn,
    fasterrcnn_resnet50_fpn,
)
from models.detection.generalized_rcnn import GeneralizedRCNN
from models.detection.parity_check import detection_parity
from models.detection.shapes_detector import (
    SHAPES_PREPROCESS,
    SHAPES_WEIGHTS,
    build_shapes_detector,
    load_shapes_weights,
    shapes_example_inputs,
    shapes_labels,
)

__all__ = [
    "OUTPUT_NAMES",
    "SHAPES_PREPROCESS",
    "SHAPES_WEIGHTS",
    "FasterRCNN",
    "GeneralizedRCNN",
    "build_shapes_detector",
    "detection_parity",
    "fasterrcnn_mobilenet_v2_fpn",
    "fasterrcnn_resnet50_fpn",
    "load_shapes_weights",
    "shapes_example_inputs",
    "shapes_labels",
]
