"""The accuracy gate: an INT8 or BF16 variant is served only if its task's metric stays within a
threshold of its FP32 parent's, both measured here on the same held-out data (models/data/calibration.py).

    task                      metric (held-out)                              default threshold
    Fashion-MNIST classifier  test accuracy, % (10,000 test images)          drop <= 1.0 point
    ImageNet classifier       against FP32's own noise floor (no labelled ImageNet offline), on crops
                              of natural photos disjoint from calibration:
                              top-1 agreement where FP32's top-1 p >= 0.5     >= 99.5 %
                              top-1 disagreement with FP32, all crops         <= FP32's own under JPEG
                                                                                q95 / one-pixel shift
                              mean KL(FP32 || candidate) of the softmax       <= 0.05 nats
    shapes detector           mAP@0.5 (models/detection/evaluate.py)         drop <= 0.01
    shapes segmenters         mIoU (models/segmentation/evaluate.py)         drop <= 0.01
    autoencoder               reconstruction MSE (Fashion-MNIST test)        increase <= 10% relative
    encoder                   1-NN retrieval accuracy, % (test queries        drop <= 1.0 point
                              against FP32 latents of training images)

The metrics run through the runtime that would serve the file (runtimes.Runner), so what is gated is
what is served. A refusal names the metric, both values and the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncore.spec import GateFigure, ModelMeta, Task
from export.defaults import (
    GATE_ACCURACY_POINTS,
    GATE_CONFIDENT_AGREEMENT_PCT,
    GATE_CONFIDENT_P,
    GATE_MAP50,
    GATE_MEAN_KL,
    GATE_MIOU,
    GATE_MSE_RELATIVE,
)
from export.runtimes import Runner, runner

FASHION_TEST_IMAGES = 10_000
AUTOENCODER_TEST_IMAGES = 2_000
ENCODER_GALLERY_IMAGES = 2_000
ENCODER_QUERY_IMAGES = 2_000
DETECTOR_HELDOUT = 150
SEGMENTER_HELDOUT = 200
# Raw runners (export/runtimes.py) take any batch: the config's max_batch_size, sized afterwards from the
# served variant's curve (export/batch_sizing.py), never bounds them. Small models run far faster batched.
EVAL_BATCH = 32


@dataclass(frozen=True)
class GateThresholds:
    """Largest allowed loss per metric kind; `python -m export ... --gate-*` flags override them."""

    accuracy_points: float = GATE_ACCURACY_POINTS  # accuracy and agreement, in percentage points
    map50: float = GATE_MAP50
    miou: float = GATE_MIOU
    mse_relative: float = GATE_MSE_RELATIVE
    confident_agreement_pct: float = GATE_CONFIDENT_AGREEMENT_PCT
    mean_kl: float = GATE_MEAN_KL


def _label(f: GateFigure) -> str:
    return f.variant.split("/")[0].upper() if f.variant else "INT8"


class GateRefused(RuntimeError):
    """The candidate lost more than its threshold; the message says which metric and by how much."""

    def __init__(self, model: str, failed: list[GateFigure]) -> None:
        self.model = model
        self.figures = failed
        super().__init__(
            f"{model}: {_label(failed[0])} refused by the accuracy gate: " + "; ".join(describe(f) for f in failed)
        )


def describe(f: GateFigure) -> str:
    label = _label(f)
    if f.rule == "relative_increase":
        change = (f.int8 - f.fp32) / f.fp32 if f.fp32 else float("inf")
        return (
            f"{f.metric} {label} {f.int8:.5g} vs FP32 {f.fp32:.5g} (+{100 * change:.1f}%, threshold "
            f"{100 * f.threshold:.3g}% relative increase)"
        )
    if f.rule in ("at_least", "at_most"):
        sign = ">=" if f.rule == "at_least" else "<="
        return f"{f.metric} {label} {f.int8:.4g} vs FP32 {f.fp32:.4g} (threshold {sign} {f.threshold:.4g})"
    return (
        f"{f.metric} {label} {f.int8:.4g} vs FP32 {f.fp32:.4g} (drop {f.fp32 - f.int8:.3g}, threshold "
        f"{f.threshold:.3g})"
    )


def _batched(run: Runner, x: np.ndarray, output: str | None = None) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), EVAL_BATCH):
        for k, v in run(x[i : i + EVAL_BATCH]).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


# --- per-task metrics: (runner for FP32, runner for INT8, meta) -> list of (name, fp32, int8, rule, threshold)

Figures = list[GateFigure]


def _fashion_accuracy(fp32: Runner, int8: Runner, meta: ModelMeta, th: GateThresholds) -> Figures:
    from models.data.calibration import fashion_pictures, preprocess_all
    from models.data.fashion_mnist import load

    images, labels = load("test")
    images, labels = images[:FASHION_TEST_IMAGES], labels[:FASHION_TEST_IMAGES]
    x = preprocess_all(fashion_pictures(images, meta.preprocess), meta.preprocess)

    def acc(run: Runner) -> float:
        logits = next(iter(_batched(run, x).values()))
        return 100.0 * float(np.mean(logits.argmax(1) == labels))

    return [
        GateFigure(
            metric="test_accuracy_pct",
            fp32=acc(fp32),
            int8=acc(int8),
            rule="drop",
            threshold=th.accuracy_points,
            held_out=f"{len(images)} Fashion-MNIST test images",
        )
    ]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _shifted(x: np.ndarray) -> np.ndarray:
    """The same crops one pixel to the right (the first column repeated): an imperceptible change."""
    out = np.empty_like(x)
    out[..., 1:] = x[..., :-1]
    out[..., :1] = x[..., :1]
    return out


# FP32's figures on the held-out crops do not depend on the candidate: computed once per FP32 session.
_FP32_FLOOR: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, dict[str, float]]] = {}


def _imagenet_noise_floor(fp32: Runner, meta: ModelMeta) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(held-out inputs, FP32 logits, FP32's top-1 disagreement with itself in % per perturbation)."""
    from models.data.calibration import HELDOUT_CROPS, HELDOUT_PHOTOS, jpeg_reencoded, photo_crops, preprocess_all

    key = (id(fp32), meta.name)
    if key not in _FP32_FLOOR:
        crops = photo_crops(HELDOUT_PHOTOS, HELDOUT_CROPS, seed=1)
        x = preprocess_all(crops, meta.preprocess)
        a = next(iter(_batched(fp32, x).values()))
        top1 = a.argmax(1)
        floor = {}
        for what, xp in (
            ("jpeg_q95", preprocess_all(jpeg_reencoded(crops, 95), meta.preprocess)),
            ("shift_1px", _shifted(x)),
        ):
            ap = next(iter(_batched(fp32, xp).values()))
            floor[what] = 100.0 * float(np.mean(ap.argmax(1) != top1))
        _FP32_FLOOR.clear()  # one model at a time: do not hold every model's logits
        _FP32_FLOOR[key] = (x, a, floor)
    return _FP32_FLOOR[key]


def _imagenet_agreement(fp32: Runner, int8: Runner, meta: ModelMeta, th: GateThresholds) -> Figures:
    from models.data.calibration import HELDOUT_PHOTOS

    x, a, floor = _imagenet_noise_floor(fp32, meta)
    b = next(iter(_batched(int8, x).values()))
    pa, pb = _softmax(a), _softmax(b)
    confident = pa.max(1) >= GATE_CONFIDENT_P
    agree = a.argmax(1) == b.argmax(1)
    confident_agreement = 100.0 * float(np.mean(agree[confident])) if confident.any() else 100.0
    disagreement = 100.0 * float(np.mean(~agree))
    kl = float(np.mean(np.sum(pa * (np.log(np.clip(pa, 1e-30, None)) - np.log(np.clip(pb, 1e-30, None))), axis=1)))
    noise = max(floor.values())
    held = (
        f"{len(x)} crops of {len(HELDOUT_PHOTOS)} natural photos not used for calibration "
        f"({int(confident.sum())} where FP32's top-1 p >= {GATE_CONFIDENT_P}; FP32's own disagreement "
        + ", ".join(f"{k} {v:.1f}%" for k, v in floor.items())
        + ")"
    )
    return [
        GateFigure(
            metric="confident_top1_agreement_pct",
            fp32=100.0,
            int8=confident_agreement,
            rule="at_least",
            threshold=th.confident_agreement_pct,
            held_out=held,
        ),
        GateFigure(
            metric="top1_disagreement_pct",
            fp32=noise,
            int8=disagreement,
            rule="at_most",
            threshold=noise,
            held_out=held,
        ),
        GateFigure(metric="mean_kl_nats", fp32=0.0, int8=kl, rule="at_most", threshold=th.mean_kl, held_out=held),
    ]


def _detector_map(fp32: Runner, int8: Runner, meta: ModelMeta, th: GateThresholds) -> Figures:
    from models.detection.evaluate import evaluate_runner

    num_classes = len(meta.labels or []) or 6
    values = [evaluate_runner(r, meta.preprocess, num_classes, n=DETECTOR_HELDOUT)["mAP50"] for r in (fp32, int8)]
    return [
        GateFigure(
            metric="mAP50",
            fp32=values[0],
            int8=values[1],
            rule="drop",
            threshold=th.map50,
            held_out=f"{DETECTOR_HELDOUT} held-out shapes pictures",
        )
    ]


def _segmenter_miou(fp32: Runner, int8: Runner, meta: ModelMeta, th: GateThresholds) -> Figures:
    from PIL import Image

    from cnncore.postprocess import segmentation_mask
    from cnncore.preprocess import preprocess
    from models.segmentation.evaluate import confusion_matrix, held_out_samples, iou_per_class

    samples = held_out_samples(SEGMENTER_HELDOUT)
    prepared = [preprocess(Image.fromarray(s.image), meta.preprocess) for s in samples]
    x = np.stack([p[0] for p in prepared])

    def miou(run: Runner) -> float:
        logits = next(iter(_batched(run, x).values()))
        k = logits.shape[1]
        conf = np.zeros((k, k), dtype=np.int64)
        for s, (_, geometry), lg in zip(samples, prepared, logits, strict=True):
            conf += confusion_matrix(segmentation_mask(lg, geometry), s.semantic, k)
        return float(np.nanmean(iou_per_class(conf)))

    return [
        GateFigure(
            metric="mIoU",
            fp32=miou(fp32),
            int8=miou(int8),
            rule="drop",
            threshold=th.miou,
            held_out=f"{len(samples)} held-out shapes pictures",
        )
    ]


def _autoencoder_mse(fp32: Runner, int8: Runner, meta: ModelMeta, th: GateThresholds) -> Figures:
    from models.data.calibration import fashion_pictures, preprocess_all
    from models.data.fashion_mnist import load

    images, _ = load("test")
    x = preprocess_all(fashion_pictures(images[:AUTOENCODER_TEST_IMAGES], meta.preprocess), meta.preprocess)

    def mse(run: Runner) -> float:
        return float(np.mean((_batched(run, x)["reconstruction"] - x) ** 2))

    return [
        GateFigure(
            metric="reconstruction_mse",
            fp32=mse(fp32),
            int8=mse(int8),
            rule="relative_increase",
            threshold=th.mse_relative,
            held_out=f"{len(x)} Fashion-MNIST test images",
        )
    ]


def _encoder_retrieval(fp32: Runner, int8: Runner, meta: ModelMeta, th: GateThresholds) -> Figures:
    from models.data.calibration import fashion_pictures, preprocess_all
    from models.data.fashion_mnist import load

    train, train_labels = load("train")
    test, test_labels = load("test")
    # the gallery: FP32 latents of the last training images (calibration samples the whole split,
    # which does not matter here: the queries are test images)
    gallery_x = preprocess_all(fashion_pictures(train[-ENCODER_GALLERY_IMAGES:], meta.preprocess), meta.preprocess)
    gallery = next(iter(_batched(fp32, gallery_x).values())).reshape(len(gallery_x), -1)
    gallery_labels = train_labels[-ENCODER_GALLERY_IMAGES:]
    qx = preprocess_all(fashion_pictures(test[:ENCODER_QUERY_IMAGES], meta.preprocess), meta.preprocess)
    q_labels = test_labels[:ENCODER_QUERY_IMAGES]

    def accuracy(run: Runner) -> float:
        q = next(iter(_batched(run, qx).values())).reshape(len(qx), -1)
        d = (q**2).sum(1)[:, None] - 2 * q @ gallery.T + (gallery**2).sum(1)[None, :]
        return 100.0 * float(np.mean(gallery_labels[d.argmin(1)] == q_labels))

    return [
        GateFigure(
            metric="retrieval_1nn_accuracy_pct",
            fp32=accuracy(fp32),
            int8=accuracy(int8),
            rule="drop",
            threshold=th.accuracy_points,
            held_out=f"{len(qx)} Fashion-MNIST test queries, {len(gallery_x)} training images as gallery",
        )
    ]


Metric = Callable[[Runner, Runner, ModelMeta, GateThresholds], Figures]


def metric_for(meta: ModelMeta) -> Metric:
    """The gate's metric for a model; ValueError when its task has none defined."""
    if meta.task == Task.classification:
        return _fashion_accuracy if meta.preprocess.color == "L" else _imagenet_agreement
    table: dict[Task, Metric] = {
        Task.detection: _detector_map,
        Task.segmentation: _segmenter_miou,
        Task.autoencoder: _autoencoder_mse,
        Task.encoder: _encoder_retrieval,
    }
    if meta.task not in table:
        raise ValueError(f"{meta.name}: no accuracy gate metric for task {meta.task.value!r}")
    return table[meta.task]


def passed(f: GateFigure) -> bool:
    if f.rule == "relative_increase":
        return f.int8 <= f.fp32 * (1.0 + f.threshold)
    if f.rule == "at_least":
        return f.int8 >= f.threshold
    if f.rule == "at_most":
        return f.int8 <= f.threshold
    return f.fp32 - f.int8 <= f.threshold


def run_gate(
    meta: ModelMeta, fp32: Runner, int8: Runner, thresholds: GateThresholds = GateThresholds(), variant: str = ""
) -> Figures:
    """Every figure of the model's metric, each with `passed` set; GateRefused is the caller's to raise.
    `variant`: the candidate's '<precision>/<runtime>', recorded with each figure."""
    figures = metric_for(meta)(fp32, int8, meta, thresholds)
    return [f.model_copy(update={"passed": passed(f), "variant": variant}) for f in figures]


def check(meta: ModelMeta, figures: Figures) -> None:
    failed = [f for f in figures if not f.passed]
    if failed:
        raise GateRefused(meta.name, failed)


def gate_paths(
    meta: ModelMeta,
    fp32_path: Path,
    int8_path: Path,
    runtime: str = "onnxruntime",
    thresholds: GateThresholds = GateThresholds(),
    threads: int = 2,
) -> Figures:
    return run_gate(meta, runner(fp32_path, "onnxruntime", threads), runner(int8_path, runtime, threads), thresholds)
