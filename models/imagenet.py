"""What every ImageNet-1k classifier shares: the 1000 class names and how it is registered.

Labels are in torchvision's order (index 281 'tabby' ... 967 'espresso'); the file is the
standard list (as in pytorch/hub's imagenet_classes.txt, underscores as spaces).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from torch import nn

from cnncore.spec import Task
from models.registry import IMAGENET_PREPROCESS, ModelEntry, WeightsLoader, register

__all__ = ["IMAGENET_CLASSES_FILE", "imagenet_labels", "register_imagenet_classifier"]

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
IMAGENET_INPUT_SHAPE = (3, 224, 224)


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    labels = tuple(line.strip() for line in IMAGENET_CLASSES_FILE.read_text().splitlines() if line.strip())
    if len(labels) != 1000:
        raise ValueError(f"{IMAGENET_CLASSES_FILE} has {len(labels)} labels, expected 1000")
    return labels


def register_imagenet_classifier(
    name: str,
    builder: Callable[..., nn.Module],
    description: str,
    weights: WeightsLoader | None = None,
    served_by_default: bool = False,
    parity_rtol: float | None = None,
) -> ModelEntry:
    return register(
        ModelEntry(
            name=name,
            builder=builder,
            task=Task.classification,
            input_shape=IMAGENET_INPUT_SHAPE,
            preprocess=IMAGENET_PREPROCESS,
            labels=imagenet_labels,
            weights=weights,
            served_by_default=served_by_default,
            description=description,
            output_names=("logits",),
            parity_rtol=parity_rtol,
        )
    )
