"""CIFAR-style residual networks: the ResNets of He et al. 2015 and the pre-activation ResNets of 2016.

Design idea (2015, "Deep Residual Learning", section 4.2): a block learns a residual F(x) and adds it
to its input, so extra depth can at worst learn F = 0 and never has to approximate an identity
through a stack of nonlinear layers. The small-image networks are deliberately plain: a 3x3 stem,
then three stages of n basic blocks (two 3x3 convs each) at 16/32/64 channels, the feature map halved
and the width doubled at each stage boundary, global average pooling and one linear layer: 6n+2
weighted layers (n=3 -> resnet20, ..., n=18 -> resnet110).

Shortcuts use option A (identity; at a stage boundary, subsample by 2 and zero-pad the new channels)
as in the paper's CIFAR experiments: it adds no parameters, so the depth comparison is purely about
depth (resnet20 keeps its famous ~0.27M parameters), and it lowers to plain Slice + Pad in ONNX.

Pre-activation (He et al. 2016, "Identity Mappings in Deep Residual Networks"): moving BN and ReLU in
front of each convolution (BN-ReLU-conv) leaves the shortcut path a clean identity from the first
block to the last, with no ReLU after the addition. Signal and gradient then reach any block
directly (x_L = x_l + sum of residuals), which is what makes the 1001-layer network trainable.
Those deep variants use bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4): 9n+2 layers,
n=18 -> preact_resnet164, n=111 -> preact_resnet1001. Where the shape changes, the shortcut is a
1x1 projection applied to the pre-activated input, as in the paper's CIFAR code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnncore.spec import PreprocessSpec, Task
from models.data import fashion_mnist
from models.registry import ModelEntry, register

__all__ = [
    "CifarResNet",
    "PreActResNet",
    "count_weighted_layers",
    "preact_resnet164",
    "preact_resnet1001",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: stride-s subsampling plus zero channels, parameter-free."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad the channel dim on both sides, as the reference implementations do, so the identity
        # channels stay in the middle of the widened tensor.
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; ReLU after the residual addition (the 2015 ordering)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            ZeroPadShortcut(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 16/32/64 channels, three stages, option-A shortcuts."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class PreActBottleneck(nn.Module):
    """BN-ReLU-1x1 (reduce) -> BN-ReLU-3x3 -> BN-ReLU-1x1 (expand x4); nothing after the addition."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut: nn.Module | None = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
            if stride != 1 or in_planes != out_planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # A projecting shortcut takes the pre-activated input (it is the first op of a new stage);
        # an identity shortcut takes x untouched, which keeps the path clean end to end.
        shortcut = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet-(9n+2) with bottleneck blocks: stage widths 16/32/64 (outputs x4)."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(PreActBottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * PreActBottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        # The residual stream is never normalised inside the blocks, so one BN-ReLU closes it.
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _init_weights(model: nn.Module) -> None:
    # He (fan_out) init for ReLU nets, BN as identity: the initialisation of both papers.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_weighted_layers(model: nn.Module) -> int:
    """Depth as the papers count it: convolutions and linear layers on the main path.

    Projection shortcuts are excluded, as in the papers' "164"/"1001" (and option A has none).
    """
    shortcut_ids = {
        id(m)
        for block in model.modules()
        if isinstance(block, (BasicBlock, PreActBottleneck)) and isinstance(block.shortcut, nn.Conv2d)
        for m in [block.shortcut]
    }
    return sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in shortcut_ids)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(3, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(5, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(7, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(9, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(18, num_classes, in_channels)


def preact_resnet164(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    return PreActResNet(18, num_classes, in_channels)


def preact_resnet1001(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    return PreActResNet(111, num_classes, in_channels)


# CIFAR-10 statistics: the architecture-only entries are exported at CIFAR's 3x32x32.
_CIFAR_PREPROCESS = PreprocessSpec(
    input_size=(32, 32), resize="stretch", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)

_ARCH_ONLY: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "resnet20_cifar": (resnet20, 20),
    "resnet32_cifar": (resnet32, 32),
    "resnet44_cifar": (resnet44, 44),
    "resnet56_cifar": (resnet56, 56),
    "resnet110_cifar": (resnet110, 110),
    "preact_resnet164": (preact_resnet164, 164),
}
# preact_resnet1001 stays a builder, not a registry entry: it demonstrates that the pre-activation
# identity path lets a 1001-layer net build and run forward (tests/test_cifar_resnet.py), but with random
# weights its tiny logits (~5e-3) are dominated by float32 rounding accumulated over 1001 layers, so
# eager vs ONNX Runtime parity is not a meaningful check of the exporter for it, and an entry the
# registry lists is one `export` must be able to check.

for _name, (_builder, _depth) in _ARCH_ONLY.items():
    register(
        ModelEntry(
            name=_name,
            builder=_builder,
            task=Task.classification,
            input_shape=(3, 32, 32),
            preprocess=_CIFAR_PREPROCESS,
            weights=None,
            description=f"{_depth}-layer {'pre-activation ' if 'preact' in _name else ''}CIFAR ResNet "
            "(architecture only, random init)",
            builder_kwargs={"in_channels": 3, "num_classes": 10},
        )
    )


# ---- The served model: resnet20 trained here on Fashion-MNIST (models/training/train_fashion.py) ----

FASHION_WEIGHTS = Path(__file__).resolve().parent / "weights" / "fashion_resnet20.safetensors"


def fashion_checkpoint_accuracy() -> float | None:
    """Test accuracy the training recipe measured, stored in the checkpoint's metadata.

    Read from the file itself so the description can never drift from the committed weights;
    tests/test_fashion.py re-measures it independently.
    """
    if not FASHION_WEIGHTS.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(FASHION_WEIGHTS), framework="pt") as fh:
        value = (fh.metadata() or {}).get("test_acc")
    if value is None or value == "nan":  # "nan": a run interrupted before its final evaluation
        return None
    return float(value)


def _load_fashion_weights(model: nn.Module) -> str:
    from safetensors.torch import load_file

    if not FASHION_WEIGHTS.is_file():
        raise FileNotFoundError(f"Fashion-MNIST checkpoint missing: {FASHION_WEIGHTS}")
    model.load_state_dict(load_file(str(FASHION_WEIGHTS)), strict=True)
    return f"trained here on Fashion-MNIST (models/training/train_fashion.py): {FASHION_WEIGHTS.name}"


def _fashion_labels() -> list[str]:
    return list(fashion_mnist.CLASSES)


# Fashion-MNIST images are light garments on a black background (inverted product photos). A served
# model is sent ordinary photos, a dark or coloured garment on a light background, so preprocessing
# converts to grayscale, stretches to 28x28 (the dataset's products fill a square frame) and inverts,
# then normalises with the training statistics. Feed dataset-style images by inverting them first.
FASHION_PREPROCESS = PreprocessSpec(
    input_size=(28, 28), color="L", resize="stretch", invert=True, mean=(fashion_mnist.MEAN,), std=(fashion_mnist.STD,)
)

register(
    ModelEntry(
        name="fashion_resnet20",
        builder=resnet20,
        task=Task.classification,
        input_shape=(1, 28, 28),
        preprocess=FASHION_PREPROCESS,
        labels=_fashion_labels,
        weights=_load_fashion_weights,
        served_by_default=True,
        description="CIFAR ResNet-20 trained here on Fashion-MNIST ("
        + (f"test top-1 {_acc:.2%}" if (_acc := fashion_checkpoint_accuracy()) is not None else "checkpoint missing")
        + "); expects a dark garment on a light background",
        builder_kwargs={"in_channels": 1, "num_classes": 10},
    )
)
