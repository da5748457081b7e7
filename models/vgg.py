"""VGG (Simonyan & Zisserman, 2014): depth from nothing but stacked 3x3 convolutions.

The design idea: replace large kernels by stacks of 3x3 ones. Two stacked 3x3 convolutions see a 5x5
receptive field (three see 7x7) with 2 * 9c^2 = 18c^2 weights instead of 25c^2 for one 5x5 layer
(27c^2 vs 49c^2 for 7x7), and put a ReLU between them, so the network is deeper, more non-linear and
cheaper per unit of receptive field. Channels double after each 2x2 max pool (64 -> 512), and the
configurations A/B/D/E give VGG-11/13/16/19; the `_bn` variants add batch norm after every conv.

Module layout and names match torchvision exactly so its checkpoints load with strict=True.
"""

from __future__ import annotations

import torch
from torch import nn

from models.imagenet import register_imagenet_classifier

__all__ = [
    "VGG",
    "make_layers",
    "cfgs",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
]

# Conv output channels, "M" = 2x2 max pool. Keys are the paper's column names (torchvision's too).
cfgs: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(
        self, features: nn.Module, num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            # torchvision's scheme (He init for convs, small normal for the FC head) so a model trained
            # here starts from the same distribution as one trained with torchvision's recipes.
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def make_layers(cfg: list[int | str], batch_norm: bool = False) -> nn.Sequential:
    """One flat nn.Sequential, so state-dict indices (features.N.*) match torchvision's."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            v = int(v)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def _vgg(cfg: str, batch_norm: bool, **kwargs) -> VGG:
    return VGG(make_layers(cfgs[cfg], batch_norm=batch_norm), **kwargs)


def vgg11(**kwargs) -> VGG:
    return _vgg("A", False, **kwargs)


def vgg11_bn(**kwargs) -> VGG:
    return _vgg("A", True, **kwargs)


def vgg13(**kwargs) -> VGG:
    return _vgg("B", False, **kwargs)


def vgg13_bn(**kwargs) -> VGG:
    return _vgg("B", True, **kwargs)


def vgg16(**kwargs) -> VGG:
    return _vgg("D", False, **kwargs)


def vgg16_bn(**kwargs) -> VGG:
    return _vgg("D", True, **kwargs)


def vgg19(**kwargs) -> VGG:
    return _vgg("E", False, **kwargs)


def vgg19_bn(**kwargs) -> VGG:
    return _vgg("E", True, **kwargs)


for _depth, _cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E")):
    register_imagenet_classifier(
        f"vgg{_depth}",
        globals()[f"vgg{_depth}"],
        f"VGG-{_depth} (config {_cfg}): stacked 3x3 convolutions only (architecture only)",
    )
    register_imagenet_classifier(
        f"vgg{_depth}_bn",
        globals()[f"vgg{_depth}_bn"],
        f"VGG-{_depth} with batch norm (config {_cfg}): stacked 3x3 convolutions only (architecture only)",
    )
