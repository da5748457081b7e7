"""Feature extractors for the detector: zoo classifiers (ImageNet-pretrained when weights exist) with
an FPN on top, laid out with torchvision's module names so its checkpoints load strictly."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, stored as buffers (torchvision layout of
    pretrained detection checkpoints: no num_batches_tracked)."""

    weight: Tensor  # buffers, registered in __init__
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A BatchNorm2d checkpoint (with num_batches_tracked) loads into the frozen layout too.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a FrozenBatchNorm2d with its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            assert child.weight is not None and child.bias is not None, f"{name}: BatchNorm2d without affine"
            assert child.running_mean is not None and child.running_var is not None, f"{name}: no running stats"
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


class IntermediateLayerGetter(nn.ModuleDict):
    """Keeps a model's children up to the last returned one and returns their outputs by new name."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        wanted = dict(return_layers)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        remaining = set(wanted)
        for name, child in model.named_children():
            layers[name] = child
            remaining.discard(name)
            if not remaining:
                break
        if remaining:
            raise ValueError(f"layers {sorted(remaining)} not found in the model")
        super().__init__(layers)
        self.return_layers = wanted

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class FeaturePyramidNetwork(nn.Module):
    """Lateral 1x1 + top-down nearest upsampling + 3x3 output convs (keys inner_blocks.i.0 / layer_blocks.i.0)."""

    def __init__(self, in_channels_list: Sequence[int], out_channels: int, extra_max_pool: bool) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels_list
        )
        self.extra_max_pool = extra_max_pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        names = list(x.keys())
        feats = list(x.values())
        last_inner = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        if self.extra_max_pool:  # torchvision's LastLevelMaxPool: one more, coarser level for the RPN
            names.append("pool")
            results.append(F.max_pool2d(results[-1], 1, 2, 0))
        return OrderedDict(zip(names, results, strict=True))


class BackboneWithFPN(nn.Module):
    def __init__(
        self, body: IntermediateLayerGetter, in_channels_list: Sequence[int], out_channels: int, extra_max_pool: bool
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_max_pool)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def _zoo_model(name: str, pretrained: bool) -> tuple[nn.Module, str]:
    """A classifier from the model registry, with its trained weights when asked and available."""
    from models.registry import get_entry

    entry = get_entry(name)
    model = entry.builder(**entry.builder_kwargs)
    source = "random init"
    if pretrained:
        if entry.weights is None:
            raise ValueError(f"zoo model {name!r} has no pretrained weights")
        source = entry.weights(model)
    return model, source


def resnet50_fpn_backbone(
    frozen_bn: bool = False, trainable_layers: int = 3, pretrained: bool = False
) -> BackboneWithFPN:
    """torchvision's fasterrcnn_resnet50_fpn backbone: layers 1-4 -> FPN(256) + max-pool level.

    frozen_bn=True gives the layout of torchvision's pretrained (COCO) checkpoints.
    """
    import models.resnet  # noqa: F401  (registers the resnet family)

    resnet, _ = _zoo_model("resnet50", pretrained)
    if frozen_bn:
        freeze_batchnorm(resnet)
    # As torchvision: only the last `trainable_layers` stages are fine-tuned.
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    for name, p in resnet.named_parameters():
        if all(not name.startswith(s) for s in stages):
            p.requires_grad_(False)
    body = IntermediateLayerGetter(resnet, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
    return BackboneWithFPN(body, [256, 512, 1024, 2048], 256, extra_max_pool=True)


# MobileNetV2 `features` indices whose outputs have strides 8, 16 and 32 (channels 32, 96, 320).
MOBILENET_V2_RETURN = {"6": "0", "13": "1", "17": "2"}
MOBILENET_V2_CHANNELS = [32, 96, 320]


def mobilenet_v2_fpn_backbone(out_channels: int = 64, pretrained: bool = False) -> BackboneWithFPN:
    """The zoo's MobileNetV2 feature extractor (strides 8/16/32) with a light FPN, for CPU training."""
    import models.mobilenetv2  # noqa: F401  (registers the family)

    mobilenet, _ = _zoo_model("mobilenet_v2", pretrained)
    body = IntermediateLayerGetter(mobilenet.get_submodule("features"), MOBILENET_V2_RETURN)
    return BackboneWithFPN(body, MOBILENET_V2_CHANNELS, out_channels, extra_max_pool=False)
