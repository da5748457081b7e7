"""Mean IoU of an exported segmenter on the held-out synthetic shapes set, through ONNX Runtime.

    python -m models.segmentation.evaluate --onnx PATH [--model shapes_segmenter_bilinear] [--n 200]
    python -m models.segmentation.evaluate --repository REPO --model NAME [--record] [--benchmark]

Each held-out image (several sizes and aspect ratios, generated from a seed the training never uses)
goes through exactly what
the server does: `cnncore.preprocess.preprocess` with the entry's PreprocessSpec, the ONNX model, and
`cnncore.postprocess.segmentation_mask` (logits resized to the original size, then argmax). The mask is
compared with the generator's exact semantic truth at the original resolution, so the number measures
the served output, not a PyTorch approximation of it. Torch-free: numpy, Pillow and onnxruntime.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cnncore.layout import latest_onnx
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


def evaluate_onnx(onnx_path: Path, spec: PreprocessSpec, labels: list[str] | None, n: int = HELD_OUT_SIZE,
                  batch_size: int = 8) -> dict:
    """{"iou": {class: IoU}, "miou": float, "images": n, "seconds": float} for the ONNX model at `onnx_path`."""
    import onnxruntime as ort
    from PIL import Image

    from cnncore.postprocess import segmentation_mask
    from cnncore.preprocess import preprocess

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    num_classes = session.get_outputs()[0].shape[1]
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{onnx_path}: {num_classes} output classes but {len(labels)} labels")
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    samples = held_out_samples(n)
    t0 = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs, geometries = zip(*(preprocess(Image.fromarray(s.image), spec) for s in chunk), strict=True)
        (logits,) = session.run(None, {input_name: np.stack(inputs)})
        for sample, geometry, lg in zip(chunk, geometries, logits, strict=True):
            conf += confusion_matrix(segmentation_mask(lg, geometry), sample.semantic, num_classes)
    seconds = time.perf_counter() - t0
    ious = iou_per_class(conf)
    names = labels or [str(i) for i in range(num_classes)]
    return {
        "iou": {name: float(v) for name, v in zip(names, ious, strict=True)},
        "miou": float(np.nanmean(ious)),
        "images": len(samples),
        "seconds": seconds,
    }


def benchmark_onnx(onnx_path: Path, input_shape: tuple[int, ...], batch_size: int, seconds: float = 5.0) -> float:
    """Images per second of the bare ONNX Runtime session (no pre/postprocessing) at `batch_size`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    session.run(None, {name: x})  # warm-up
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {name: x})
        runs += 1
    return runs * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.segmentation.evaluate", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help="exported segmenter model.onnx (preprocessing from the registry entry)")
    src.add_argument("--repository", type=Path, help="a model repository written by `python -m export`")
    parser.add_argument("--model", default="shapes_segmenter_bilinear", help="registry / repository model name")
    parser.add_argument("--n", type=int, default=HELD_OUT_SIZE, help="number of held-out images")
    parser.add_argument("--record", action="store_true", help="with --repository: store mIoU in model.json metrics")
    parser.add_argument("--benchmark", action="store_true", help="also time the bare ONNX session at batch 1 and 8")
    args = parser.parse_args(argv)
    if args.repository is not None:
        model_dir = args.repository / args.model
        try:
            path, meta = latest_onnx(model_dir)
        except FileNotFoundError as exc:
            parser.error(str(exc))
        spec, labels = meta.preprocess, meta.labels
    else:
        import models  # noqa: F401  (registers the entries)
        from models.registry import get_entry

        entry = get_entry(args.model)
        path, spec = args.onnx, entry.preprocess
        labels = list(entry.labels()) if entry.labels else None
    if not path.is_file():
        parser.error(f"no such file: {path}")

    result = evaluate_onnx(path, spec, labels, args.n)
    print(f"{args.model}: {result['images']} held-out images (seed {HELD_OUT_SEED}), ONNX Runtime, "
          f"{result['seconds']:.1f}s incl. pre/postprocessing")
    for name, iou in result["iou"].items():
        print(f"  IoU {name:<12} {iou:.4f}")
    print(f"mean IoU {result['miou']:.4f}")
    if args.benchmark:
        shape = (3 if spec.color == "RGB" else 1, *spec.input_size)
        for bs in (1, 8):
            print(f"ONNX Runtime CPU, batch {bs}: {benchmark_onnx(path, shape, bs):.1f} images/s")
    if args.record and args.repository is not None:
        meta.metrics["mIoU"] = round(result["miou"], 4)
        meta.write(args.repository / args.model)
        print(f"recorded mIoU in {args.repository / args.model / 'model.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
