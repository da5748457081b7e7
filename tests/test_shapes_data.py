"""The synthetic shapes generator: determinism, exact ground truth, bounded occlusion."""

from __future__ import annotations

import numpy as np
import pytest

from models.data.shapes import CLASSES, ShapeSample, generate_batch, generate_sample


def test_same_seed_same_sample_and_different_seed_differs() -> None:
    a, b, c = generate_sample(7), generate_sample(7), generate_sample(8)
    for field in ("image", "boxes", "labels", "masks", "semantic"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("size", [(256, 256), (200, 320)])
def test_types_shapes_and_exact_boxes(size: tuple[int, int]) -> None:
    for sample in generate_batch(12, seed=3, size=size):
        assert isinstance(sample, ShapeSample)
        h, w = size
        n = len(sample.labels)
        assert 1 <= n <= 4
        assert sample.image.shape == (h, w, 3) and sample.image.dtype == np.uint8
        assert sample.boxes.shape == (n, 4) and sample.boxes.dtype == np.float32
        assert sample.labels.dtype == np.int64 and sample.labels.min() >= 1 and sample.labels.max() <= len(CLASSES)
        assert sample.masks.shape == (n, h, w) and sample.masks.dtype == bool
        assert sample.semantic.shape == (h, w) and sample.semantic.dtype == np.uint8
        for box, mask, label in zip(sample.boxes, sample.masks, sample.labels, strict=True):
            ys, xs = np.nonzero(mask)
            assert tuple(box) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # The semantic map agrees with the visible instance masks (later shapes occlude earlier).
            assert (sample.semantic[mask] == label).all()
        assert ((sample.semantic > 0) == sample.masks.any(axis=0)).all()
        # Visible masks never overlap: occluded pixels belong to the shape on top only.
        assert sample.masks.sum(axis=0).max() <= 1


def test_shapes_are_visible_and_batches_do_not_repeat() -> None:
    batch = generate_batch(20, seed=0)
    other = generate_batch(20, seed=1)
    assert not any(np.array_equal(a.image, b.image) for a in batch for b in other)
    labels = np.concatenate([s.labels for s in batch])
    assert len(set(labels.tolist())) >= len(CLASSES) - 1  # every class shows up in a modest batch
    for s in batch:
        areas = s.masks.reshape(len(s.labels), -1).sum(axis=1)
        assert (areas >= 40).all()
