"""Faster R-CNN family: registry entries and the export hooks detection needs.

- `shapes_detector` (served by default): MobileNetV2 (ImageNet) + light FPN, trained on the synthetic
  shapes data by models/training/train_detector.py; weights in models/weights/detector_shapes.safetensors.
- `fasterrcnn_resnet50_fpn`: torchvision's architecture and state-dict layout (COCO, 91 classes),
  architecture only: `get_model("fasterrcnn_resnet50_fpn", weights="coco.pth")` loads a user's
  torchvision checkpoint (pretrained layout, FrozenBatchNorm2d) with strict=True.

Label index i of a detector's output names labels()[i]; index 0 is "__background__" and never appears
in a detection (padding rows past num_detections carry label 0, score 0 and a zero box).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnncore.spec import PreprocessSpec, Task
from models.detection import ops
from models.detection.coco_labels import COCO_CATEGORIES
from models.detection.faster_rcnn import (
    OUTPUT_NAMES,
    SHAPES_IMAGE_SIZE,
    FasterRCNN,
    fasterrcnn_mobilenet_v2_fpn,
    fasterrcnn_resnet50_fpn,
)
from models.registry import ModelEntry, load_state_dict_file, register

SHAPES_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "detector_shapes.safetensors"

# The model normalises internally (ImageNet mean/std), so the served input is plain [0,1] RGB,
# letterboxed: aspect ratio kept, grey padding, boxes map back with one scale and offset.
SHAPES_PREPROCESS = PreprocessSpec(input_size=SHAPES_IMAGE_SIZE, resize="letterbox", pad_value=0.5)
RESNET50_FPN_INPUT = (800, 800)
RESNET50_FPN_PREPROCESS = PreprocessSpec(input_size=RESNET50_FPN_INPUT, resize="letterbox", pad_value=0.0)


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
    return f"{SHAPES_WEIGHTS.name} (models/training/train_detector.py: MobileNetV2 ImageNet backbone fine-tuned on synthetic shapes)"


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


def resnet50_example_inputs(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    # Noise pictures only. A blank picture through this random-init network gives many detections with
    # bit-identical scores (a translation-equivariant net on a constant input): boxes one anchor stride
    # apart, between which NMS may keep either, and ONNX Runtime's NonMaxSuppression breaks such exact
    # ties differently from the eager reference. Blank pictures are checked on the trained detector,
    # where they give no detections (shapes_example_inputs).
    return torch.rand((n, 3, *RESNET50_FPN_INPUT), generator=g)


def detection_parity(
    torch_out: dict[str, np.ndarray],
    ort_out: dict[str, np.ndarray],
    box_atol: float = 1e-2,
    score_atol: float = 1e-3,
    box_rtol: float = 5e-4,
) -> dict:
    """Same detections: counts and labels equal, boxes and scores within tolerance, padding zero.

    Rows are compared in score order; detections whose scores tie within float noise may come out in
    any order between runtimes, so a row is accepted when any row with the same label and a tied score
    matches it. Box tolerance scales with the box (box_atol + box_rtol * max(width, height, |coord|)):
    float32 rounding in a decoded delta grows with the box it scales (measured on the random-init
    ResNet-50 FPN at 800 px: 0.06-0.1 px on boxes 60-370 px wide).
    """
    n_t, n_o = torch_out["num_detections"], ort_out["num_detections"]
    if not np.array_equal(n_t, n_o):
        raise AssertionError(f"num_detections differ: torch {n_t.tolist()} vs onnx {n_o.tolist()}")
    max_box = max_score = 0.0
    for i, k in enumerate(n_t.tolist()):
        tb, ts, tl = torch_out["boxes"][i, :k], torch_out["scores"][i, :k], torch_out["labels"][i, :k]
        ob, os_, ol = ort_out["boxes"][i, :k], ort_out["scores"][i, :k], ort_out["labels"][i, :k]
        for j in range(k):
            extent = max(tb[j, 2] - tb[j, 0], tb[j, 3] - tb[j, 1], np.abs(tb[j]).max())
            match = [
                m for m in range(k)
                if ol[m] == tl[j]
                and abs(os_[m] - ts[j]) <= score_atol
                and np.all(np.abs(ob[m] - tb[j]) <= box_atol + box_rtol * extent)
            ]
            if not match:
                raise AssertionError(
                    f"image {i} detection {j}: torch (label {tl[j]}, score {ts[j]:.5f}, box {tb[j].tolist()}) "
                    f"has no counterpart in onnx (label {ol[j]}, score {os_[j]:.5f}, box {ob[j].tolist()})"
                )
            m = match[0]
            max_box = max(max_box, float(np.abs(ob[m] - tb[j]).max()))
            max_score = max(max_score, float(abs(os_[m] - ts[j])))
        for name in ("boxes", "scores", "labels"):
            if np.any(ort_out[name][i, k:] != 0):
                raise AssertionError(f"image {i}: onnx {name} not zero-padded past num_detections={k}")
    return {"ok": True, "num_detections": n_t.tolist(), "max_box_abs": max_box, "max_score_abs": max_score}


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
        description="Faster R-CNN, MobileNetV2 (ImageNet) + 3-level FPN(64), trained on synthetic shapes on real textures",
        output_names=OUTPUT_NAMES,
        onnx_translation_table=ops.onnx_translation_table,
        example_inputs=shapes_example_inputs,
        parity_check=detection_parity,
        max_batch_size=16,
    )
)

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
