"""Architecture cards of registry models: parameters, MACs and receptive fields against known values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from export.card import build_card, layer_macs, layer_table
from models.registry import get_entry, get_model

ROOT = Path(__file__).resolve().parents[1]

# Known values at 224x224 (MACs as counted by the usual profilers: conv + linear multiply-adds) and
# the classic theoretical receptive fields of the deepest feature map.
KNOWN = {
    "resnet18": (11_689_512, 1.814e9, 435),
    "resnet50": (25_557_032, 4.089e9, 427),
    "vgg16": (138_357_544, 15.47e9, 212),
    "alexnet": (61_100_840, 0.714e9, 195),
}


@pytest.mark.parametrize("name", [n for n in KNOWN if n in models.list_models()])
def test_card_known_models(name: str):
    torch.manual_seed(0)
    model = get_model(name, weights=None)
    card = build_card(name, model, get_entry(name).input_shape)
    params, macs, rf = KNOWN[name]
    assert card.params == params
    assert card.macs == pytest.approx(macs, rel=2e-3)
    assert card.flops == 2 * card.macs
    assert card.receptive_field == rf
    assert card.layers[-1].output_shape == (1, 1000)


def test_layer_macs_by_hand():
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    x = torch.zeros(1, 4, 5, 5)
    assert layer_macs(conv, x, conv(x)) == (8 * 5 * 5) * (4 // 2) * 9
    lin = nn.Linear(10, 3)
    v = torch.zeros(2, 10)
    assert layer_macs(lin, v, lin(v)) == 2 * 3 * 10
    tconv = nn.ConvTranspose2d(4, 6, 2, stride=2)
    assert layer_macs(tconv, x, tconv(x)) == 4 * 5 * 5 * 6 * 4


def test_layer_table_shapes_and_params():
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    rows = layer_table(m, (3, 32, 32))
    assert [r.output_shape for r in rows] == [
        (1, 8, 16, 16),
        (1, 8, 16, 16),
        (1, 8, 16, 16),
        (1, 8, 1, 1),
        (1, 8),
        (1, 5),
    ]
    assert [r.params for r in rows] == [3 * 8 * 9 + 8, 16, 0, 0, 0, 45]


def test_describe_cli():
    name = "resnet20_cifar" if "resnet20_cifar" in models.list_models() else models.list_models()[0]
    out = subprocess.run(
        [sys.executable, "-m", "export", "describe", name], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "receptive field" in out.stdout and "parameters" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "export", "describe", "no_such_model"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 1 and "unknown model 'no_such_model'" in bad.stderr
