"""Postprocessing maps model outputs back onto the original picture, for every resize policy."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cnncore.postprocess import (
    UNSEEN,
    class_fractions,
    detections,
    label_of,
    mask_png,
    reconstruction_image,
    segmentation_mask,
    softmax,
    top_k,
)
from cnncore.preprocess import Geometry, preprocess
from cnncore.spec import PreprocessSpec


def test_top_k_orders_and_normalises() -> None:
    logits = np.array([0.5, 3.0, -1.0, 2.0], np.float32)
    idx, probs = top_k(logits, 3)
    assert idx.tolist() == [1, 3, 0]
    full = softmax(logits)
    np.testing.assert_allclose(probs, full[[1, 3, 0]], rtol=1e-6)
    np.testing.assert_allclose(full.sum(), 1.0, rtol=1e-6)
    assert top_k(logits, 99)[0].shape == (4,)  # capped at the number of classes
    assert softmax(np.array([1000.0, 0.0]))[0] == pytest.approx(1.0)  # no overflow


def test_label_of() -> None:
    assert label_of(["a", "b"], 1) == "b"
    assert label_of(["a", "b"], 7) == "7"
    assert label_of(None, 2) == "2"


def letterbox_geometry() -> Geometry:
    spec = PreprocessSpec(input_size=(100, 100), resize="letterbox")
    _, geo = preprocess(Image.new("RGB", (200, 100)), spec)
    return geo


def test_detections_sliced_filtered_and_mapped() -> None:
    geo = letterbox_geometry()  # 200x100 -> scale 0.5, pad_y 25
    assert (geo.scale_x, geo.pad_x, geo.pad_y) == (0.5, 0.0, 25.0)
    boxes = np.zeros((5, 4), np.float32)
    boxes[0] = [10, 35, 30, 45]
    boxes[1] = [50, 25, 100, 75]
    boxes[2] = [0, 0, 1, 1]
    scores = np.array([0.6, 0.9, 0.3, 0.99, 0.99], np.float32)  # rows 3, 4 are padding
    classes = np.array([1, 2, 1, 3, 3])
    det = detections(np.array([3]), boxes, scores, classes, geo, score_threshold=0.5)
    assert det.classes.tolist() == [2, 1]
    np.testing.assert_allclose(det.scores, [0.9, 0.6])
    np.testing.assert_allclose(det.boxes, [[100, 0, 200, 100], [20, 20, 60, 40]])
    assert detections(0, boxes, scores, classes, geo).boxes.shape == (0, 4)
    assert len(detections(3, boxes, scores, classes, geo, max_detections=1).scores) == 1


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(input_size=(64, 64), resize="stretch"),
        PreprocessSpec(input_size=(64, 64), resize="letterbox"),
    ],
    ids=["stretch", "letterbox"],
)
def test_segmentation_mask_lands_on_original_pixels(spec: PreprocessSpec) -> None:
    # A picture with a known rectangle; logits that say "class 1" exactly where the preprocessed
    # picture is bright: the mask at the original size must recover the rectangle.
    ow, oh = 150, 90
    truth = np.zeros((oh, ow), bool)
    truth[20:70, 40:110] = True
    pic = Image.fromarray((truth * 255).astype(np.uint8)).convert("RGB")
    tensor, geo = preprocess(pic, spec)
    bright = tensor[0]
    logits = np.stack([0.5 - bright, bright - 0.5])
    if spec.resize == "letterbox":
        logits[:, bright == 0] = [[1.0], [-1.0]]  # padding is background
    mask = segmentation_mask(logits.astype(np.float32), geo)
    assert mask.shape == (oh, ow)
    iou = np.logical_and(mask == 1, truth).sum() / np.logical_or(mask == 1, truth).sum()
    assert iou > 0.95
    frac = class_fractions(mask, 2)
    np.testing.assert_allclose(frac.sum(), 1.0, rtol=1e-6)
    assert frac[1] == pytest.approx(truth.mean(), abs=0.02)


def test_segmentation_centre_crop_marks_unseen_edges() -> None:
    spec = PreprocessSpec(input_size=(32, 32), resize="shorter_side_then_center_crop")
    _, geo = preprocess(Image.new("RGB", (64, 32)), spec)
    mask = segmentation_mask(np.stack([np.zeros((32, 32)), np.ones((32, 32))]).astype(np.float32), geo)
    assert mask.shape == (32, 64)
    assert (mask[:, :16] == UNSEEN).all() and (mask[:, 48:] == UNSEEN).all()
    assert (mask[:, 16:48] == 1).all()
    np.testing.assert_allclose(class_fractions(mask, 2), [0.0, 1.0])


def test_mask_png_keeps_class_indices() -> None:
    mask = np.array([[0, 1], [2, 3]], np.uint8)
    img = Image.open(io.BytesIO(mask_png(mask)))
    assert img.mode == "P"
    np.testing.assert_array_equal(np.asarray(img), mask)
    pal = img.getpalette()
    assert pal is not None and pal[0:3] == [0, 0, 0] and pal[3:6] != pal[6:9]


def test_reconstruction_undoes_normalisation() -> None:
    spec = PreprocessSpec(input_size=(28, 28), color="L", mean=(0.5,), std=(0.25,), invert=True)
    pic = Image.fromarray(np.linspace(0, 255, 28 * 28).reshape(28, 28).astype(np.uint8), "L")
    tensor, _ = preprocess(pic, spec)
    back = reconstruction_image(tensor, spec)
    assert back.mode == "L" and back.size == (28, 28)
    assert np.abs(np.asarray(back, np.int16) - np.asarray(pic, np.int16)).max() <= 1
    rgb = reconstruction_image(np.zeros((3, 4, 5), np.float32), PreprocessSpec(input_size=(4, 5)))
    assert rgb.mode == "RGB" and rgb.size == (5, 4)
