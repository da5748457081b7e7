"""Training-time target assignment: IoU matching of anchors/proposals to ground truth and
balanced positive/negative sampling (torchvision's Matcher and BalancedPositiveNegativeSampler)."""

from __future__ import annotations

import torch
from torch import Tensor

from models.detection.ops import box_iou

BELOW_LOW = -1
BETWEEN = -2


class Matcher:
    """For each prediction, the index of its best ground truth, or BELOW_LOW / BETWEEN thresholds."""

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool) -> None:
        self.high, self.low, self.allow_low_quality_matches = high, low, allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou [num_gt, num_pred] -> matches [num_pred] (int64)."""
        if iou.numel() == 0 or iou.shape[0] == 0:
            return torch.full((iou.shape[1],), BELOW_LOW, dtype=torch.int64)
        best, matches = iou.max(dim=0)
        original = matches.clone()
        matches[best < self.low] = BELOW_LOW
        matches[(best >= self.low) & (best < self.high)] = BETWEEN
        if self.allow_low_quality_matches:
            # Every ground truth keeps the predictions that overlap it best, even below `high`,
            # so a small object with no anchor above threshold still gets trained on.
            best_per_gt = iou.max(dim=1).values
            gt_idx, pred_idx = torch.nonzero(iou == best_per_gt[:, None], as_tuple=True)
            matches[pred_idx] = original[pred_idx]
        return matches


def match(gt_boxes: Tensor, preds: Tensor, matcher: Matcher) -> Tensor:
    return matcher(box_iou(gt_boxes, preds))


def sample_balanced(
    labels: Tensor, batch_size: int, positive_fraction: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """labels [P]: 1 positive, 0 negative, -1 ignore -> (positive indices, negative indices)."""
    pos = torch.nonzero(labels >= 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(pos.numel(), int(batch_size * positive_fraction))
    n_neg = min(neg.numel(), batch_size - n_pos)
    pos = pos[torch.randperm(pos.numel(), generator=generator)[:n_pos]]
    neg = neg[torch.randperm(neg.numel(), generator=generator)[:n_neg]]
    return pos, neg
