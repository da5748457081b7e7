"""Second stage: multi-scale RoIAlign, box head (TwoMLPHead), predictor, and static post-processing.

Post-processing (class-aware NMS, score threshold, detections per image) produces fixed-size padded
outputs: boxes [B,K,4], scores [B,K], labels [B,K] and num_detections [B], so a batching server
slices row i to num_detections[i] and a TensorRT engine needs no data-dependent output shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.detection import ops
from models.detection.box_coder import DEFAULT_XFORM_CLIP, BoxCoder, box_sizes_at_least, clip_boxes
from models.detection.matcher import Matcher, match, sample_balanced


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign from the FPN level each box belongs to (FPN paper eq. 1, torchvision's LevelMapper).

    Every level is pooled for every box and the right one selected with a mask: a few times more
    arithmetic than gathering per level, but no data-dependent shapes, which is what export needs.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: tuple[int, int] = (7, 7),
        sampling_ratio: int = 2,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned

    @staticmethod
    def _scale(feature_size: int, image_size: int) -> float:
        return 2.0 ** round(math.log2(feature_size / image_size))

    def forward(self, features: dict[str, Tensor], rois: Tensor, image_size: tuple[int, int]) -> Tensor:
        """rois [B,R,4] -> pooled [B,R,C,oh,ow]."""
        feats = [features[n] for n in self.featmap_names]
        scales = [self._scale(f.shape[-2], image_size[0]) for f in feats]
        if len(feats) == 1:
            return ops.roi_align(feats[0], rois, scales[0], self.output_size, self.sampling_ratio, self.aligned)
        k_min, k_max = -math.log2(scales[0]), -math.log2(scales[-1])
        area = (rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1])
        k = torch.floor(self.canonical_level + torch.log2(torch.sqrt(area) / self.canonical_scale + 1e-6))
        level = (k.clamp(min=k_min, max=k_max) - k_min).to(torch.int64)  # [B,R]
        if torch.is_grad_enabled() and not torch.compiler.is_exporting() and rois.shape[0] == 1:
            # Training (one image at a time): pool each box at its own level only, 3x less work.
            out = rois.new_zeros((1, rois.shape[1], feats[0].shape[1], *self.output_size))
            for i, (f, s) in enumerate(zip(feats, scales, strict=True)):
                sel = torch.nonzero(level[0] == i).flatten()
                if sel.numel():
                    pooled = ops.roi_align(f, rois[:, sel], s, self.output_size, self.sampling_ratio, self.aligned)
                    out = out.index_copy(1, sel, pooled)
            return out
        summed: Tensor | None = None
        for i, (f, s) in enumerate(zip(feats, scales, strict=True)):
            pooled = ops.roi_align(f, rois, s, self.output_size, self.sampling_ratio, self.aligned)
            chosen = (level == i).to(pooled.dtype)[..., None, None, None]
            summed = pooled * chosen if summed is None else summed + pooled * chosen
        assert summed is not None  # two or more levels here
        return summed


class TwoMLPHead(nn.Module):
    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class FastRCNNPredictor(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


@dataclass
class BoxHeadConfig:
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    bbox_xform_clip: float = DEFAULT_XFORM_CLIP
    min_size: float = 1e-2


class RoIHeads(nn.Module):
    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        box_head: nn.Module,
        box_predictor: FastRCNNPredictor,
        config: BoxHeadConfig,
    ) -> None:
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.cfg = config
        self.box_coder = BoxCoder(config.box_coder_weights, config.bbox_xform_clip)
        self.matcher = Matcher(config.fg_iou_thresh, config.bg_iou_thresh, allow_low_quality_matches=False)

    def _classify(
        self, features: dict[str, Tensor], rois: Tensor, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        pooled = self.box_roi_pool(features, rois, image_size)  # [B,R,C,oh,ow]
        return self.box_predictor(self.box_head(pooled.flatten(0, 1)))

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: Tensor,
        proposal_valid: Tensor,
        image_size: tuple[int, int],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if targets is not None:
            return {}, self._loss(features, proposals, proposal_valid, image_size, targets)
        class_logits, box_regression = self._classify(features, proposals, image_size)
        return self.postprocess(class_logits, box_regression, proposals, proposal_valid, image_size), {}

    def postprocess(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: Tensor,
        proposal_valid: Tensor,
        image_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        bsz, n_rois = proposals.shape[:2]
        num_classes = class_logits.shape[-1]
        scores = F.softmax(class_logits, -1).reshape(bsz, n_rois, num_classes)[..., 1:]  # drop background
        boxes = self.box_coder.decode(box_regression.reshape(bsz, n_rois, num_classes, 4), proposals[:, :, None, :])
        boxes = clip_boxes(boxes, image_size)[:, :, 1:]  # [B,R,C-1,4]
        labels = torch.arange(1, num_classes, device=scores.device).expand(bsz, n_rois, -1)
        valid = (
            (scores > self.cfg.score_thresh) & box_sizes_at_least(boxes, self.cfg.min_size) & proposal_valid[..., None]
        )
        scores = torch.where(valid, scores, torch.full_like(scores, -1.0)).reshape(bsz, -1)
        boxes = boxes.reshape(bsz, -1, 4)
        labels = labels.reshape(bsz, -1)
        # Class-aware NMS as one call: each class's boxes are shifted into a disjoint region.
        offset = float(max(image_size) + 1)
        keep = ops.nms_mask(
            boxes + (labels.to(boxes.dtype) * offset)[..., None], scores, self.cfg.nms_thresh, self.cfg.score_thresh
        )
        ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
        k = self.cfg.detections_per_img
        k_eff = min(k, ranked.shape[1])
        top, idx = ranked.topk(k_eff, dim=1)  # sorted: kept detections first, best first
        found = top >= 0
        out_boxes = torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4)) * found[..., None].to(boxes.dtype)
        out_scores = torch.where(found, top, torch.zeros_like(top))
        out_labels = torch.gather(labels, 1, idx) * found.to(labels.dtype)
        if k_eff < k:  # fewer candidates than K: pad to the static output size
            pad = k - k_eff
            out_boxes = F.pad(out_boxes, (0, 0, 0, pad))
            out_scores = F.pad(out_scores, (0, pad))
            out_labels = F.pad(out_labels, (0, pad))
        return {
            "num_detections": found.sum(dim=1).to(torch.int64),
            "boxes": out_boxes,
            "scores": out_scores,
            "labels": out_labels.to(torch.int64),
        }

    def _loss(
        self,
        features: dict[str, Tensor],
        proposals: Tensor,
        proposal_valid: Tensor,
        image_size: tuple[int, int],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        sampled_rois, sampled_labels, sampled_targets = [], [], []
        for i, t in enumerate(targets):
            gt, gt_labels = t["boxes"], t["labels"]
            # Ground truth joins the proposals so the head always sees some perfect positives.
            cand = torch.cat([proposals[i][proposal_valid[i]], gt])
            matches = match(gt, cand, self.matcher)
            labels = torch.where(matches >= 0, gt_labels[matches.clamp(min=0)], torch.zeros_like(matches))
            labels[matches == -2] = -1
            pos, neg = sample_balanced(
                (labels > 0).long() - (labels < 0).long(), self.cfg.batch_size_per_image, self.cfg.positive_fraction
            )
            idx = torch.cat([pos, neg])
            sampled_rois.append(cand[idx])
            sampled_labels.append(labels[idx])
            reg = torch.zeros(idx.numel(), 4, dtype=cand.dtype)
            if pos.numel():
                reg[: pos.numel()] = self.box_coder.encode(gt[matches[pos]], cand[pos])
            sampled_targets.append(reg)
        # Images may sample different counts; pool each image on its own (training runs eagerly).
        logits, deltas = [], []
        for i, rois in enumerate(sampled_rois):
            f_i = {n: f[i : i + 1] for n, f in features.items()}
            c, d = self._classify(f_i, rois[None], image_size)
            logits.append(c)
            deltas.append(d)
        class_logits = torch.cat(logits)
        box_regression = torch.cat(deltas)
        labels = torch.cat(sampled_labels)
        reg_targets = torch.cat(sampled_targets)
        loss_cls = F.cross_entropy(class_logits, labels)
        pos = torch.nonzero(labels > 0).flatten()
        pred = box_regression.reshape(labels.numel(), -1, 4)[pos, labels[pos]]
        loss_box = F.smooth_l1_loss(pred, reg_targets[pos], beta=1 / 9, reduction="sum") / max(labels.numel(), 1)
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
