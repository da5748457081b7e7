"""Mean IoU of a segmenter on the held-out synthetic shapes set, for any batch runner.

Each held-out image (several sizes and aspect ratios, generated from a seed the training never uses)
goes through exactly what the server does: `cnncore.preprocess.preprocess` with the entry's
PreprocessSpec, the model, and `cnncore.postprocess.segmentation_mask` (logits resized to the original
size, then argmax). The mask is compared with the generator's exact semantic truth at the original
resolution, so on an exported file the number measures the served output. Torch-free: numpy and Pillow.
`python -m export.evaluate.segmentation` runs it on an exported file; training and the accuracy gate
use the held-out set and the metric directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from cnncore.spec import PreprocessSpec

HELD_OUT_SEED = 20261127  # per-image seeds derive from (base seed, index): no overlap with training
HELD_OUT_SIZE = 200
# (height, width) of generated pictures, used in turn: served images come in any aspect ratio, and the
# letterbox preprocessing must keep a circle round in all of them.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((256, 256), (200, 300), (300, 200), (240, 320), (256, 256), (192, 256))


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] int64 counts, rows = truth, columns = prediction."""
    idx = truth.astype(np.int64).reshape(-1) * num_classes + pred.astype(np.int64).reshape(-1)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class from an accumulated confusion matrix (NaN for a class absent from truth and prediction).

    Accumulated over the whole set (PASCAL VOC style), so tiny shapes weigh by their pixels, not per image.
    """
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def shape_samples(n: int, seed: int) -> list:
    """n generated pictures, sizes cycling through IMAGE_SIZES, deterministic in (n, seed)."""
    from models.data.shapes import generate_sample

    seeds = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64)
    return [generate_sample(int(s), IMAGE_SIZES[i % len(IMAGE_SIZES)]) for i, s in enumerate(seeds)]


def held_out_samples(n: int = HELD_OUT_SIZE) -> list:
    return shape_samples(n, HELD_OUT_SEED)


def evaluate_runner(
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    spec: PreprocessSpec,
    labels: list[str] | None,
    n: int = HELD_OUT_SIZE,
    batch_size: int = 8,
) -> dict:
    """{"iou": {class: IoU}, "miou": float, "images": n, "seconds": float} of any batch runner whose first
    output is the [B, classes, H, W] logits."""
    from PIL import Image

    from cnncore.postprocess import segmentation_mask
    from cnncore.preprocess import preprocess

    conf: np.ndarray | None = None
    samples = held_out_samples(n)
    t0 = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs, geometries = zip(*(preprocess(Image.fromarray(s.image), spec) for s in chunk), strict=True)
        logits = next(iter(run(np.stack(inputs)).values()))
        num_classes = logits.shape[1]
        if conf is None:
            if labels is not None and len(labels) != num_classes:
                raise ValueError(f"{num_classes} output classes but {len(labels)} labels")
            conf = np.zeros((num_classes, num_classes), dtype=np.int64)
        for sample, geometry, lg in zip(chunk, geometries, logits, strict=True):
            conf += confusion_matrix(segmentation_mask(lg, geometry), sample.semantic, num_classes)
    seconds = time.perf_counter() - t0
    if conf is None:
        raise ValueError(f"n must be at least 1, got {n}")
    ious = iou_per_class(conf)
    names = labels or [str(i) for i in range(len(ious))]
    return {
        "iou": {name: float(v) for name, v in zip(names, ious, strict=True)},
        "miou": float(np.nanmean(ious)),
        "images": len(samples),
        "seconds": seconds,
    }
