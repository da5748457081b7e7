"""mAP@0.5 of a detector on the held-out synthetic shapes set, for any batch runner.

Pictures are generated at assorted sizes and aspect ratios, preprocessed with the *server's*
letterbox code (cnncore.preprocess with the model's PreprocessSpec) and the boxes mapped back to
picture pixels with the same Geometry the server uses, so the number is what is served. Training
measures its PyTorch model with it, the accuracy gate an exported file; `python -m
export.evaluate.detection` measures an exported file on a runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cnncore.preprocess import preprocess
from cnncore.spec import PreprocessSpec

# Held-out seeds live far away from the training seeds (train_detector uses seeds < 10**6).
HELDOUT_SEED = 987_654_321
HELDOUT_SIZE = 300
# Held-out pictures: square ones at the model size, and letterboxed landscape / portrait ones.
HELDOUT_PICTURE_SIZES: tuple[tuple[int, int], ...] = ((256, 256), (240, 320), (320, 256), (384, 384), (200, 300))


@dataclass
class Detections:
    boxes: np.ndarray  # [n,4] in picture pixels
    scores: np.ndarray  # [n]
    labels: np.ndarray  # [n]


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the interpolated precision/recall curve (VOC 2010+ / COCO all-point style)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def mean_average_precision(
    predictions: Sequence[Detections],
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """mAP over foreground classes 1..num_classes; each ground truth matches at most one detection."""
    per_class: dict[str, float] = {}
    for c in range(1, num_classes + 1):
        scored: list[tuple[float, bool]] = []
        n_gt = 0
        for det, (gt_boxes, gt_labels) in zip(predictions, ground_truth, strict=True):
            gt = gt_boxes[gt_labels == c]
            n_gt += len(gt)
            sel = det.labels == c
            boxes, scores = det.boxes[sel], det.scores[sel]
            order = np.argsort(-scores, kind="stable")
            iou = box_iou_np(boxes[order], gt)
            used = np.zeros(len(gt), dtype=bool)
            for i, k in enumerate(order):
                hit = False
                if len(gt):
                    cand = np.where(used, -1.0, iou[i])
                    j = int(cand.argmax())
                    if cand[j] >= iou_threshold:
                        used[j] = hit = True
                scored.append((float(scores[k]), hit))
        if n_gt == 0:
            continue
        scored.sort(key=lambda t: -t[0])
        hits = np.array([h for _, h in scored], dtype=bool)
        tp = np.cumsum(hits)
        fp = np.cumsum(~hits)
        recall = tp / n_gt if len(hits) else np.zeros(0)
        precision = tp / np.maximum(tp + fp, 1) if len(hits) else np.zeros(0)
        per_class[str(c)] = average_precision(recall, precision)
    return {
        "mAP50": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        **{f"AP50_class{k}": v for k, v in per_class.items()},
    }


def heldout_set(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED):
    """(picture, gt boxes, gt labels) triples, deterministic."""
    from models.data.shapes import generate_sample

    seeds = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64)
    for i, s in enumerate(seeds):
        sample = generate_sample(int(s), HELDOUT_PICTURE_SIZES[i % len(HELDOUT_PICTURE_SIZES)])
        yield Image.fromarray(sample.image), sample.boxes, sample.labels


def evaluate_runner(
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    spec: PreprocessSpec,
    num_classes: int,
    n: int = HELDOUT_SIZE,
    batch: int = 8,
) -> dict[str, float]:
    """mAP of any batch runner (input [B,3,H,W] -> output dict) on the held-out set."""
    preds: list[Detections] = []
    gts: list[tuple[np.ndarray, np.ndarray]] = []
    pending: list[tuple[np.ndarray, object]] = []

    def flush() -> None:
        out = run(np.stack([x for x, _ in pending]))
        for i, (_, geom) in enumerate(pending):
            k = int(out["num_detections"][i])
            preds.append(
                Detections(geom.to_original(out["boxes"][i, :k]), out["scores"][i, :k], out["labels"][i, :k])  # type: ignore[attr-defined]
            )
        pending.clear()

    for picture, boxes, labels in heldout_set(n):
        x, geom = preprocess(picture, spec)
        pending.append((x, geom))
        gts.append((boxes, labels))
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return mean_average_precision(preds, gts, num_classes)
