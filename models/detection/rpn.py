"""Region proposal network: objectness + box deltas per anchor, decode, per-level top-k, NMS, top-n.

Inference keeps every shape static: per-level top-k uses a k fixed by the (fixed) input size, NMS
returns a mask (ops.nms_mask), and the final top-n returns exactly `post_nms_top_n` proposals per
image together with a validity mask, instead of a variable-length list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.detection import ops
from models.detection.anchors import AnchorGenerator
from models.detection.box_coder import BoxCoder, box_sizes_at_least, clip_boxes
from models.detection.matcher import Matcher, match, sample_balanced


class RPNHead(nn.Module):
    """Shared 3x3 conv, then 1x1 objectness and 1x1 deltas (torchvision key layout: conv.0.0)."""

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
                for _ in range(conv_depth)
            ]
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten_level(t: Tensor, channels_per_anchor: int) -> Tensor:
    """[B, A*C, H, W] -> [B, H*W*A, C], the (y, x, anchor) order of AnchorGenerator."""
    b, _, h, w = t.shape
    return t.view(b, -1, channels_per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, channels_per_anchor)


@dataclass
class RPNConfig:
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_size: float = 1e-3
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


class RegionProposalNetwork(nn.Module):
    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, config: RPNConfig) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.cfg = config
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(config.fg_iou_thresh, config.bg_iou_thresh, allow_low_quality_matches=True)

    def forward(
        self, features: list[Tensor], image_size: tuple[int, int], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """-> proposals [B, N, 4], valid [B, N] (bool), losses (training only)."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(image_size, [tuple(f.shape[-2:]) for f in features])
        anchors = [a.to(features[0]) for a in anchors]
        obj = [_flatten_level(t, 1).squeeze(-1) for t in logits]  # [B, A_l]
        dlt = [_flatten_level(t, 4) for t in deltas]  # [B, A_l, 4]
        training = self.training
        pre_n = self.cfg.pre_nms_top_n_train if training else self.cfg.pre_nms_top_n_test
        post_n = self.cfg.post_nms_top_n_train if training else self.cfg.post_nms_top_n_test
        # Proposal selection is not differentiated through (as in torchvision).
        proposals, valid = self._select(
            [o.detach() for o in obj], [d.detach() for d in dlt], anchors, image_size, pre_n, post_n
        )
        losses: dict[str, Tensor] = {}
        if targets is not None:
            losses = self._loss(torch.cat(obj, 1), torch.cat(dlt, 1), torch.cat(anchors, 0), targets)
        return proposals, valid, losses

    def _select(
        self,
        obj: list[Tensor],
        dlt: list[Tensor],
        anchors: list[Tensor],
        image_size: tuple[int, int],
        pre_n: int,
        post_n: int,
    ) -> tuple[Tensor, Tensor]:
        boxes_l, scores_l, levels_l = [], [], []
        for level, (o, d, a) in enumerate(zip(obj, dlt, anchors, strict=True)):
            k = min(pre_n, o.shape[1])  # static: the input size is fixed
            top, idx = o.topk(k, dim=1)
            d_top = torch.gather(d, 1, idx[..., None].expand(-1, -1, 4))
            a_top = a[idx]  # [B, k, 4]
            boxes_l.append(clip_boxes(self.box_coder.decode(d_top, a_top), image_size))
            scores_l.append(torch.sigmoid(top))
            levels_l.append(torch.full_like(top, float(level)))
        boxes = torch.cat(boxes_l, 1)
        scores = torch.cat(scores_l, 1)
        levels = torch.cat(levels_l, 1)
        valid = box_sizes_at_least(boxes, self.cfg.min_size) & (scores >= self.cfg.score_thresh)
        scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
        # NMS within each level: shifting each level's boxes into its own region makes a single
        # NMS call equivalent to one per level (torchvision's batched_nms coordinate trick).
        offset = float(max(image_size) + 1)
        keep = ops.nms_mask(boxes + (levels * offset)[..., None], scores, self.cfg.nms_thresh, -0.5)
        keep = keep & valid
        ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
        n = min(post_n, ranked.shape[1])
        top, idx = ranked.topk(n, dim=1)
        return torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4)), top >= 0

    def _loss(self, obj: Tensor, dlt: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        obj_terms, box_terms, n_sampled = [], [], 0
        for i, t in enumerate(targets):
            gt = t["boxes"]
            matches = match(gt, anchors, self.matcher)
            labels = (matches >= 0).to(obj.dtype)
            labels[matches == -2] = -1  # between thresholds: ignored
            pos, neg = sample_balanced(labels, self.cfg.batch_size_per_image, self.cfg.positive_fraction)
            sampled = torch.cat([pos, neg])
            n_sampled += sampled.numel()
            obj_terms.append(F.binary_cross_entropy_with_logits(obj[i, sampled], labels[sampled], reduction="sum"))
            if pos.numel():
                target_deltas = self.box_coder.encode(gt[matches[pos]], anchors[pos])
                box_terms.append(F.smooth_l1_loss(dlt[i, pos], target_deltas, beta=1 / 9, reduction="sum"))
        denom = max(n_sampled, 1)
        zero = obj.sum() * 0
        return {
            "loss_objectness": torch.stack(obj_terms).sum() / denom if obj_terms else zero,
            "loss_rpn_box_reg": torch.stack(box_terms).sum() / denom if box_terms else zero,
        }
