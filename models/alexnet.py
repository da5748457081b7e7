"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012), torchvision's single-GPU variant.

The design idea: a deep-for-its-time stack of large-kernel convolutions made trainable by ReLU
(non-saturating, so gradients survive depth and training is several times faster than with tanh),
regularised by dropout in the huge fully connected head (where nearly all 61M parameters live), and
downsampled with *overlapping* max pooling (3x3 windows, stride 2), which the paper found slightly
reduces overfitting compared to non-overlapping 2x2 pooling.

Module layout and names match torchvision exactly so its checkpoints load with strict=True.
"""

from __future__ import annotations

import torch
from torch import nn

from models.imagenet import register_imagenet_classifier

__all__ = ["AlexNet", "alexnet"]


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # overlapping: window 3 > stride 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        # Adaptive pooling lets the classifier accept inputs other than 224x224 (6x6 at 224 anyway).
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def alexnet(num_classes: int = 1000, dropout: float = 0.5) -> AlexNet:
    return AlexNet(num_classes=num_classes, dropout=dropout)


register_imagenet_classifier(
    "alexnet", alexnet, "AlexNet: ReLU, dropout and overlapping max pooling (architecture only)"
)
