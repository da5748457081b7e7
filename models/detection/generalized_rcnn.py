"""The generalized R-CNN glue (torchvision's GeneralizedRCNN): transform -> backbone -> RPN -> RoI heads.

Training: model.train(); model(images, targets) -> dict of losses.
Inference / export: model.eval(); model(images) -> (num_detections [N], boxes [N,K,4],
scores [N,K], labels [N,K]), static shapes except the batch, boxes in input pixels.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.detection.roi_heads import RoIHeads
from models.detection.rpn import RegionProposalNetwork
from models.detection.transform import DetectionTransform

OUTPUT_NAMES = ("num_detections", "boxes", "scores", "labels")


class GeneralizedRCNN(nn.Module):
    """Two-stage detection from its four parts; the parts decide what kind of R-CNN it is."""

    def __init__(
        self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads, transform: DetectionTransform
    ) -> None:
        super().__init__()
        # Registration order is state-dict order: torchvision's (transform, backbone, rpn, roi_heads).
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    @property
    def image_size(self) -> tuple[int, int]:
        return self.transform.image_size

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("training needs targets (list of {'boxes': [n,4], 'labels': [n]})")
        return self.forward_features(self.backbone(self.transform(images)), targets)

    def forward_features(self, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Everything after the backbone (the CPU training recipe feeds cached backbone features here)."""
        feats = list(features.values())
        proposals, valid, rpn_losses = self.rpn(feats, self.image_size, targets if self.training else None)
        detections, head_losses = self.roi_heads(
            features, proposals, valid, self.image_size, targets if self.training else None
        )
        if self.training:
            return {**rpn_losses, **head_losses}
        return tuple(detections[name] for name in OUTPUT_NAMES)
