"""CIFAR ResNets (He et al. 2015) and pre-activation ResNets (He et al. 2016): shapes, sizes, depth,
and the design facts that set them apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    PreActBottleneck,
    ZeroPadShortcut,
    count_weighted_layers,
    preact_resnet164,
    preact_resnet1001,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from models.registry import get_entry, get_model

torch.set_num_threads(1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_weights_without_bn(model: nn.Module) -> int:
    """The papers' size tables count conv and linear weights, not BN scales/shifts."""
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    return n_params(model) - bn


# Option-A parameter counts of the paper's CIFAR-10 nets (0.27M, 0.46M, 0.66M, 0.85M, 1.7M).
CIFAR_NETS = [
    (resnet20, 20, 269_722),
    (resnet32, 32, 464_154),
    (resnet44, 44, 658_586),
    (resnet56, 56, 853_018),
    (resnet110, 110, 1_727_962),
]


@pytest.mark.parametrize("builder,depth,params", CIFAR_NETS, ids=[d for _, d, _ in CIFAR_NETS])
def test_cifar_resnet_depth_params_and_forward(builder, depth, params):
    model = builder().eval()
    assert count_weighted_layers(model) == depth == 6 * len(model.layer1) + 2
    assert n_params(model) == params
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_resnet20_grayscale_28px_for_fashion_mnist():
    model = resnet20(num_classes=10, in_channels=1).eval()
    # Only the stem changes with the input channels: 16 filters x 3x3 x (3 - 1) channels fewer.
    assert n_params(model) == 269_722 - 16 * 9 * 2
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # 28 -> 14 -> 7: the stage boundaries halve the map, global pooling takes any size.
    feats = {}
    model.layer3.register_forward_hook(lambda m, i, o: feats.__setitem__("layer3", o.shape))
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28))
    assert feats["layer3"] == (1, 64, 7, 7)


def test_option_a_shortcut_is_parameter_free_identity_plus_zeros():
    sc = ZeroPadShortcut(16, 32, stride=2)
    assert n_params(sc) == 0
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])  # the identity channels, untouched
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    # Whole network: no conv sits on any shortcut.
    for block in resnet20().modules():
        if isinstance(block, BasicBlock):
            assert n_params(block.shortcut) == 0


def test_preact_keeps_a_clean_identity_path_the_2015_block_does_not():
    """With its residual branch silenced, a pre-activation block is exactly the identity; the
    original block still applies a ReLU after the addition, so negative inputs do not pass."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 6, 6)
    pre = PreActBottleneck(64, 16).eval()
    nn.init.zeros_(pre.conv3.weight)
    assert torch.equal(pre(x), x)

    post = BasicBlock(64, 64).eval()
    nn.init.zeros_(post.bn2.weight)  # residual branch output = 0 as well
    with torch.no_grad():
        y = post(x)
    assert torch.equal(y, torch.relu(x))
    assert not torch.equal(y, x)


def test_preact_resnet164_depth_and_size():
    model = preact_resnet164().eval()
    assert count_weighted_layers(model) == 164 == 9 * len(model.layer1) + 2
    assert n_params(model) == 1_703_258
    assert round(n_weights_without_bn(model) / 1e6, 1) == 1.7  # the paper's table: 1.7M
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_preact_resnet1001_builds_and_forwards():
    model = preact_resnet1001(num_classes=10, in_channels=3).eval()
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 111
    assert count_weighted_layers(model) == 1001
    assert n_params(model) == 10_327_706
    assert round(n_weights_without_bn(model) / 1e6, 1) == 10.2  # the paper's table: 10.2M
    # A tiny input keeps the CPU cost small; depth, not resolution, is what is being checked.
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


ARCH_ONLY = {
    "resnet20_cifar": 20,
    "resnet32_cifar": 32,
    "resnet44_cifar": 44,
    "resnet56_cifar": 56,
    "resnet110_cifar": 110,
    "preact_resnet164": 164,
}


@pytest.mark.parametrize("name", sorted(ARCH_ONLY))
def test_registry_architecture_only_entries(name):
    entry = get_entry(name)
    assert entry.weights is None and not entry.served_by_default
    assert entry.builder_kwargs == {"in_channels": 3, "num_classes": 10}
    assert entry.input_shape == (3, 32, 32) and entry.preprocess.input_size == (32, 32)
    with pytest.raises(ValueError, match="no trained weights"):
        get_model(name)
    if ARCH_ONLY[name] <= 164:
        model = get_model(name, weights=None)
        assert not model.training
        assert count_weighted_layers(model) == ARCH_ONLY[name]


def test_builder_kwargs_reach_the_model():
    model = get_entry("resnet20_cifar").builder(in_channels=1, num_classes=7)
    assert isinstance(model, CifarResNet)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
