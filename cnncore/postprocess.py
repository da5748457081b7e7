"""Model outputs of ONE image -> answers in the picture's own terms (labels, pixels, PNGs).

Everything here works on one image's slice of a batch and on its `Geometry` (from
cnncore.preprocess), so boxes and masks land on the original, upright image whatever resize policy
the model's preprocessing used (stretch, centre crop, letterbox). Pure numpy + Pillow: no protobuf, so
the benchmark's in-process path and the tests use exactly what the server uses.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cnncore.preprocess import Geometry
from cnncore.spec import PreprocessSpec

# Detect's default: keep every detection the model returns (the vision API's documented default, what
# proto3's unset score_threshold means; the server's bindings and the client read this one value).
DEFAULT_SCORE_THRESHOLD = 0.0

# Value of mask pixels the model never saw (outside a centre crop): PNG-palette index, not a class.
UNSEEN = 255


def label_of(labels: Sequence[str] | None, index: int) -> str:
    if labels is not None and 0 <= index < len(labels):
        return labels[index]
    return str(index)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float32)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, softmax probabilities), best first, for one image's logits [C]."""
    probs = softmax(np.asarray(logits).reshape(-1))
    k = max(1, min(k, probs.shape[0]))
    idx = np.argpartition(-probs, k - 1)[:k]
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return idx, probs[idx]


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [n, 4] x1, y1, x2, y2 in original-image pixels
    scores: np.ndarray  # [n]
    classes: np.ndarray  # [n] int


def detections(
    num_detections: int | np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    geometry: Geometry,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    max_detections: int = 0,
) -> Detections:
    """One image's padded detector rows -> its real detections, best first, in original pixels.

    The exported detector pads every image to K rows so a batch has a static shape; only the first
    `num_detections` rows are real.
    """
    n = int(np.asarray(num_detections).reshape(-1)[0])
    n = max(0, min(n, boxes.shape[0]))
    sc = np.asarray(scores[:n], dtype=np.float32)
    order = np.argsort(-sc, kind="stable")
    order = order[sc[order] >= score_threshold]
    if max_detections > 0:
        order = order[:max_detections]
    return Detections(
        boxes=geometry.to_original(np.asarray(boxes[:n])[order]).reshape(-1, 4),
        scores=sc[order],
        classes=np.asarray(classes[:n]).astype(np.int64)[order],
    )


def segmentation_mask(logits: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Per-pixel class logits [C, H, W] at model resolution -> uint8 class mask [orig_h, orig_w].

    Logits are resized bilinearly to the original size before the argmax (as torchvision's
    segmentation models do), which gives smooth boundaries instead of blocky upscaled labels. The
    argmax is kept running over classes so memory stays at two full-size maps, not C.
    """
    c, h, w = logits.shape
    if c > UNSEEN:
        raise ValueError(f"segmentation with {c} classes does not fit an 8-bit mask")
    ow, oh = geometry.orig_width, geometry.orig_height
    # Original-pixel rectangle the model input covers (all of it, unless a centre crop cut edges).
    ox0 = max(0.0, (0.0 - geometry.pad_x) / geometry.scale_x)
    oy0 = max(0.0, (0.0 - geometry.pad_y) / geometry.scale_y)
    ox1 = min(float(ow), (w - geometry.pad_x) / geometry.scale_x)
    oy1 = min(float(oh), (h - geometry.pad_y) / geometry.scale_y)
    ix0, iy0 = int(np.ceil(ox0 - 1e-6)), int(np.ceil(oy0 - 1e-6))
    ix1, iy1 = int(np.floor(ox1 + 1e-6)), int(np.floor(oy1 + 1e-6))
    mask = np.full((oh, ow), UNSEEN, dtype=np.uint8)
    if ix1 <= ix0 or iy1 <= iy0:
        return mask
    # The same rectangle in model pixels: the source box for the resize.
    box = (
        ix0 * geometry.scale_x + geometry.pad_x,
        iy0 * geometry.scale_y + geometry.pad_y,
        ix1 * geometry.scale_x + geometry.pad_x,
        iy1 * geometry.scale_y + geometry.pad_y,
    )
    box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
    size = (ix1 - ix0, iy1 - iy0)
    best: np.ndarray | None = None
    best_idx = np.zeros((iy1 - iy0, ix1 - ix0), np.uint8)
    for k in range(c):
        up = np.asarray(
            Image.fromarray(np.ascontiguousarray(logits[k], dtype=np.float32), mode="F").resize(
                size, Image.Resampling.BILINEAR, box=box
            )
        )
        if best is None:
            best = up.copy()
        else:
            better = up > best
            best[better] = up[better]
            best_idx[better] = k
    mask[iy0:iy1, ix0:ix1] = best_idx
    return mask


def class_fractions(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of the seen pixels per class, [num_classes] float32 (sums to 1 when any pixel is seen)."""
    counts = np.bincount(mask.reshape(-1), minlength=UNSEEN + 1)[:num_classes].astype(np.float64)
    total = counts.sum()
    return (counts / total if total else counts).astype(np.float32)


def palette(num_classes: int) -> list[int]:
    """The PASCAL VOC colour map (class 0 black), extended to 256 entries; UNSEEN is white."""
    colours: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.extend((r, g, b))
    colours[UNSEEN * 3 : UNSEEN * 3 + 3] = [255, 255, 255]
    return colours


_PALETTE = palette(256)


def mask_png(mask: np.ndarray) -> bytes:
    """Class-index mask -> palette PNG: the pixel values are the class indices, the colours show them."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(_PALETTE)
    return encode_png(img)


def reconstruction_image(reconstruction: np.ndarray, spec: PreprocessSpec) -> Image.Image:
    """An autoencoder's output [C, H, W], in model-input units -> a viewable 8-bit image.

    Undoes the preprocessing's normalisation and inversion, so the picture looks like the input.
    """
    x = np.asarray(reconstruction, dtype=np.float32)
    channels = x.shape[0]
    mean = np.asarray(spec.mean[:channels], np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std[:channels], np.float32).reshape(-1, 1, 1)
    x = x * std + mean
    if spec.invert:
        x = 1.0 - x
    pixels = (x.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    if channels == 1:
        return Image.fromarray(pixels[:, :, 0], mode="L")
    return Image.fromarray(pixels, mode="RGB")


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: masks are flat regions that compress well anyway; level 6 costs ~3x the time.
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()
