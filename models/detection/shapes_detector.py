"""The shipped detector, `shapes_detector` (served by default): fasterrcnn_mobilenet_v2_fpn (MobileNetV2
ImageNet backbone + light FPN) trained on the synthetic shapes data by models/training/train_detector.py;
weights in models/weights/detector_shapes.safetensors. Its registry entry stands beside its builder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnncore.spec import PreprocessSpec, Task
from models.detection import ops
from models.detection.faster_rcnn import OUTPUT_NAMES, SHAPES_IMAGE_SIZE, FasterRCNN, fasterrcnn_mobilenet_v2_fpn
from models.detection.parity_check import detection_parity
from models.registry import ModelEntry, load_state_dict_file, register

SHAPES_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "detector_shapes.safetensors"

# The model normalises internally (ImageNet mean/std), so the served input is plain [0,1] RGB,
# letterboxed: aspect ratio kept, grey padding, boxes map back with one scale and offset.
SHAPES_PREPROCESS = PreprocessSpec(input_size=SHAPES_IMAGE_SIZE, resize="letterbox", pad_value=0.5)


def shapes_labels() -> tuple[str, ...]:
    from models.data.shapes import CLASSES

    return ("__background__",) + CLASSES


def build_shapes_detector(pretrained_backbone: bool = False) -> FasterRCNN:
    """The shipped detector's architecture; pretrained_backbone=True starts from ImageNet (training)."""
    return fasterrcnn_mobilenet_v2_fpn(len(shapes_labels()), pretrained_backbone=pretrained_backbone)


def load_shapes_weights(model: nn.Module) -> str:
    if not SHAPES_WEIGHTS.is_file():
        raise FileNotFoundError(f"{SHAPES_WEIGHTS} missing: run python -m models.training.train_detector")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_state_dict_file(SHAPES_WEIGHTS).items()}
    model.load_state_dict(state, strict=True)
    return (
        f"{SHAPES_WEIGHTS.name} (models/training/train_detector.py: "
        "MobileNetV2 ImageNet backbone fine-tuned on synthetic shapes)"
    )


def shapes_example_inputs(n: int) -> torch.Tensor:
    """Parity inputs: generated shape pictures (letterboxed like the server does) and, from the
    second image on, every third one blank so the zero-detection path is exercised too."""
    from PIL import Image

    from cnncore.preprocess import preprocess
    from models.data.shapes import generate_sample

    sizes = ((256, 256), (240, 320), (320, 240))
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(np.full((3, *SHAPES_IMAGE_SIZE), 0.5, dtype=np.float32))
        else:
            picture = Image.fromarray(generate_sample(1000 + i, sizes[i % len(sizes)]).image)
            out.append(preprocess(picture, SHAPES_PREPROCESS)[0])
    return torch.from_numpy(np.stack(out))


register(
    ModelEntry(
        name="shapes_detector",
        builder=build_shapes_detector,
        task=Task.detection,
        input_shape=(3, *SHAPES_IMAGE_SIZE),
        preprocess=SHAPES_PREPROCESS,
        labels=shapes_labels,
        weights=load_shapes_weights,
        served_by_default=True,
        description=(
            "Faster R-CNN, MobileNetV2 (ImageNet) + 3-level FPN(64), trained on synthetic shapes on real textures"
        ),
        output_names=OUTPUT_NAMES,
        onnx_translation_table=ops.onnx_translation_table,
        example_inputs=shapes_example_inputs,
        parity_check=detection_parity,
        max_batch_size=16,
    )
)
