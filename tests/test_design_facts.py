"""The design facts the classic CNNs teach, checked with export.card's functions on real modules."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from export.card import conv_output_size, conv_transpose_output_size, count_params, layer_table, receptive_field


def _stack(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


@pytest.mark.parametrize("c", [4, 16, 64])
def test_two_3x3_see_5x5_with_fewer_weights(c: int):
    two_3x3 = _stack(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False))
    one_5x5 = _stack(nn.Conv2d(c, c, 5, padding=2, bias=False))
    assert receptive_field(two_3x3) == receptive_field(one_5x5) == 5
    assert count_params(two_3x3) == 18 * c * c
    assert count_params(one_5x5) == 25 * c * c
    # three 3x3 see 7x7 (VGG's argument): 27c^2 against 49c^2
    three = _stack(*[nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(3)])
    assert receptive_field(three) == 7 and count_params(three) == 27 * c * c


@pytest.mark.parametrize("c", [4, 16, 64])
def test_bottleneck_costs_17c2_against_18c2(c: int):
    bottleneck = _stack(
        nn.Conv2d(4 * c, c, 1, bias=False),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.Conv2d(c, 4 * c, 1, bias=False),
    )
    basic = _stack(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 3, padding=1, bias=False))
    assert count_params(bottleneck) == 4 * c * c + 9 * c * c + 4 * c * c == 17 * c * c
    assert count_params(basic) == 18 * c * c
    # the bottleneck works on 4x the channels for fewer weights; its 3x3 still grows the field by 2
    assert receptive_field(bottleneck) == 3 and receptive_field(basic) == 5


# output_padding must be smaller than stride or dilation (PyTorch's rule)
GRID = [g for g in itertools.product([5, 8], [1, 3, 4], [1, 2, 3], [0, 1], [1, 2], [0, 1]) if g[5] < max(g[2], g[4])]


@pytest.mark.parametrize("size,k,stride,pad,dil,out_pad", GRID)
def test_transposed_conv_output_size(size, k, stride, pad, dil, out_pad):
    expected = (size - 1) * stride - 2 * pad + dil * (k - 1) + out_pad + 1
    if expected <= 0:
        pytest.skip("empty output")
    m = nn.ConvTranspose2d(2, 3, k, stride=stride, padding=pad, dilation=dil, output_padding=out_pad)
    out = m(torch.zeros(1, 2, size, size))
    assert out.shape[-1] == out.shape[-2] == expected == conv_transpose_output_size(size, k, stride, pad, dil, out_pad)
    # and the layer table reports the same shape from a real forward
    assert layer_table(m, (2, size, size))[0].output_shape == (1, 3, expected, expected)


@pytest.mark.parametrize(
    "size,k,stride,pad,dil",
    [
        g
        for g in itertools.product([7, 32], [1, 3, 5], [1, 2], [0, 1, 2], [1, 2])
        if g[0] + 2 * g[3] >= g[4] * (g[1] - 1) + 1
    ],
)
def test_conv_output_size_matches_conv2d(size, k, stride, pad, dil):
    m = nn.Conv2d(1, 1, k, stride=stride, padding=pad, dilation=dil)
    assert m(torch.zeros(1, 1, size, size)).shape[-1] == conv_output_size(size, k, stride, pad, dil)


def _vgg_stack(convs_per_stage: list[int]) -> nn.Sequential:
    layers, c = [], 3
    for n in convs_per_stage:
        for _ in range(n):
            layers += [nn.Conv2d(c, 8, 3, padding=1), nn.ReLU()]
            c = 8
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


@pytest.mark.parametrize(
    "stages,expected",
    [
        ([1], 4),  # conv3 (3) + pool2 (stride 1 -> +1)
        ([2, 2], 16),  # 3,5,6 | (jump 2) 10,14,16
        ([2, 2, 3, 3, 3], 212),  # VGG-16's conv tower: the textbook 212
        ([2, 2, 4, 4, 4], 268),  # VGG-19's
    ],
)
def test_receptive_field_of_vgg_stacks(stages, expected):
    assert receptive_field(_vgg_stack(stages)) == expected


def test_receptive_field_recurrence_by_hand():
    # r_out = r_in + (k - 1) * dilation * jump; jump *= stride
    m = _stack(nn.Conv2d(1, 1, 7, stride=2), nn.MaxPool2d(3, stride=2), nn.Conv2d(1, 1, 3, dilation=2))
    assert receptive_field(m) == 1 + 6 * 1 + 2 * 2 + 2 * 2 * 4


def test_residual_shortcut_does_not_compound_strides():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.short = nn.Conv2d(4, 4, 1, stride=2)

        def forward(self, x):
            return self.b(self.a(x)) + self.short(x)

    m = _stack(Block(), nn.Conv2d(4, 4, 3, padding=1))
    # main path: 3, then 3 + 2*2 = 7 (jump 2); shortcut 1 (jump 2); join 7; last conv 7 + 2*2 = 11
    assert receptive_field(m) == 11
