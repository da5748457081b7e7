"""In-graph input handling (the part of torchvision's GeneralizedRCNNTransform that survives export).

The served model takes a float batch [N,3,H,W] in [0,1] at a fixed H,W: the server letterboxes each
picture to the model input size (cnncore.preprocess), so there is no in-graph resize and boxes come
out in input pixels; only the ImageNet normalisation the backbone was trained with lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectionTransform(nn.Module):
    def __init__(
        self, image_size: tuple[int, int], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        # Not persistent: torchvision's checkpoints carry no normalisation tensors.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    mean: Tensor  # buffers, registered in __init__
    std: Tensor

    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"expected input of size {self.image_size} (letterbox pictures to it), got {tuple(images.shape[-2:])}"
            )
        return (images - self.mean) / self.std
