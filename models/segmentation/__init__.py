"""Semantic segmentation of the synthetic shapes: MobileNetV2 encoder-decoder, two upsampling modes.

Registers `shapes_segmenter_bilinear` and `shapes_segmenter_transposed`: the same architecture
(encoder_decoder.EncoderDecoderSegmenter, skips on) trained by models/training/train_segmenter.py,
differing only in how the decoder upsamples. Weights are committed as fp16 safetensors (half the bytes;
the loader casts back to fp32, and the evaluation measures the cast weights).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from cnncore.spec import PreprocessSpec, Task
from models.data.shapes import CLASSES
from models.registry import IMAGENET_PREPROCESS, ModelEntry, register
from models.segmentation.encoder_decoder import EncoderDecoderSegmenter, Upsampling

__all__ = ["EncoderDecoderSegmenter", "LABELS", "PREPROCESS", "INPUT_SIZE", "weights_path"]

LABELS: tuple[str, ...] = ("background", *CLASSES)
INPUT_SIZE = (160, 160)
# Letterbox, not stretch: a shape's class is its geometry, and stretching a 300x200 picture would turn
# circles into ellipses and squares into rectangles. The padding is ImageNet-mean grey (about zero after
# normalisation, which the ImageNet-pretrained encoder reads as "nothing"). 160x160, not 128: the smallest
# shapes (12% of the short side) need more than one cell of the stride-32 features to be told apart,
# and 160 lifts held-out mIoU past 0.9 for 1.56x the pixels (train_segmenter.py has the figures).
PREPROCESS = PreprocessSpec(
    input_size=INPUT_SIZE,
    resize="letterbox",
    pad_value=0.45,
    mean=IMAGENET_PREPROCESS.mean,
    std=IMAGENET_PREPROCESS.std,
)
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def weights_path(upsampling: Upsampling) -> Path:
    return WEIGHTS_DIR / f"segmenter_{upsampling}.safetensors"


def _load_weights(upsampling: Upsampling, model: nn.Module) -> str:
    from safetensors.torch import load_file

    path = weights_path(upsampling)
    if not path.is_file():
        raise FileNotFoundError(
            f"segmenter checkpoint missing: {path}; train it with models/training/train_segmenter.py"
        )
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return f"trained here on synthetic shapes from ImageNet MobileNetV2 ({path.name})"


def _example_inputs(n: int) -> torch.Tensor:
    return torch.randn(n, 3, *INPUT_SIZE)


# Served mean IoU of the committed weights on evaluate.py's 200 held-out pictures (ONNX Runtime).
HELD_OUT_MIOU: dict[str, float] = {"bilinear": 0.912, "transposed": 0.909}

for _mode in ("bilinear", "transposed"):
    register(
        ModelEntry(
            name=f"shapes_segmenter_{_mode}",
            builder=EncoderDecoderSegmenter,
            builder_kwargs={"num_classes": len(LABELS), "upsampling": _mode, "skips": True},
            task=Task.segmentation,
            input_shape=(3, *INPUT_SIZE),
            preprocess=PREPROCESS,
            labels=lambda: LABELS,
            weights=partial(_load_weights, _mode),
            served_by_default=True,
            description=f"MobileNetV2 (ImageNet) encoder + U-Net decoder with {_mode} upsampling, "
            f"trained on synthetic shapes (held-out mIoU {HELD_OUT_MIOU[_mode]:.3f})",
            output_names=("logits",),
            example_inputs=_example_inputs,
        )
    )
