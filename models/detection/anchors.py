"""Anchor boxes over feature maps (torchvision's AnchorGenerator layout and rounding).

The model input size is fixed (the server letterboxes), so anchors depend only on static shapes and
fold into constants in the exported graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """One (sizes, aspect_ratios) pair per feature map; anchors ordered (y, x, anchor) per level."""

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]]) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError("one aspect-ratio list per size list (one pair per feature map)")
        self.sizes = [tuple(s) for s in sizes]
        self.aspect_ratios = [tuple(a) for a in aspect_ratios]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios, strict=True)]

    @staticmethod
    def base_anchors(sizes: Sequence[int], aspect_ratios: Sequence[float]) -> Tensor:
        """Zero-centred anchors [len(ratios)*len(sizes), 4]; ratio = height / width, area = size^2."""
        scales = torch.as_tensor(sizes, dtype=torch.float32)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def forward(self, image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Anchors per level, [H_l * W_l * A_l, 4] in input pixels (same for every image)."""
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(f"{len(feature_sizes)} feature maps but anchors for {len(self.sizes)}")
        out = []
        for (fh, fw), sizes, ratios in zip(feature_sizes, self.sizes, self.aspect_ratios, strict=True):
            stride_h, stride_w = image_size[0] // fh, image_size[1] // fw
            shift_x = torch.arange(fw, dtype=torch.float32) * stride_w
            shift_y = torch.arange(fh, dtype=torch.float32) * stride_h
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack([sx, sy, sx, sy], dim=1)
            out.append((shifts[:, None, :] + self.base_anchors(sizes, ratios)[None, :, :]).reshape(-1, 4))
        return out
