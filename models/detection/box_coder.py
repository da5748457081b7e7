"""Box parametrisation shared by the RPN and the box head (torchvision's BoxCoder semantics)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)  # caps exp() of predicted log-sizes (4.135...)


class BoxCoder:
    """(x1, y1, x2, y2) boxes <-> weighted (dx, dy, dw, dh) deltas relative to reference boxes."""

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = DEFAULT_XFORM_CLIP) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """Deltas that turn `references` [..., 4] into `targets` [..., 4]."""
        wx, wy, ww, wh = self.weights
        rw = references[..., 2] - references[..., 0]
        rh = references[..., 3] - references[..., 1]
        rx = references[..., 0] + 0.5 * rw
        ry = references[..., 1] + 0.5 * rh
        tw = targets[..., 2] - targets[..., 0]
        th = targets[..., 3] - targets[..., 1]
        tx = targets[..., 0] + 0.5 * tw
        ty = targets[..., 1] + 0.5 * th
        return torch.stack(
            [wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)], dim=-1
        )

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """Apply deltas [..., 4] to references [..., 4] (broadcastable) -> boxes [..., 4]."""
        wx, wy, ww, wh = self.weights
        rw = references[..., 2] - references[..., 0]
        rh = references[..., 3] - references[..., 1]
        rx = references[..., 0] + 0.5 * rw
        ry = references[..., 1] + 0.5 * rh
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.bbox_xform_clip)
        cx = dx * rw + rx
        cy = dy * rh + ry
        w = torch.exp(dw) * rw
        h = torch.exp(dh) * rh
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip (x1, y1, x2, y2) boxes to an image of (height, width)."""
    h, w = image_size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def box_sizes_at_least(boxes: Tensor, min_size: float) -> Tensor:
    """Mask of boxes whose width and height are both >= min_size."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)
