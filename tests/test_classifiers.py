"""ImageNet classifiers: torchvision-identical state-dict layouts, parameter counts, registry entries,
forward shapes and the design facts each family embodies.

Layouts are checked against facts read off torchvision 0.29.1 (tests/fixtures/torchvision/*.json,
copied from the shared fixture dump); torchvision itself is not importable here and not needed.
Layout checks build on the meta device: no memory, no init cost, even for VGG-19 and ResNet-152.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cnncore.spec import Task
from models._utils import _make_divisible
from models.imagenet import imagenet_labels
from models.mobilenetv2 import InvertedResidual, MobileNetV2
from models.registry import IMAGENET_PREPROCESS, get_entry, get_model, list_models
from models.resnet import BasicBlock, Bottleneck, resnet18

FIXTURES = Path(__file__).parent / "fixtures" / "torchvision"

# The counts the issue names; the fixtures hold the same numbers for these and for the other VGGs.
EXPECTED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg19": 143_667_240,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "mobilenet_v2": 3_504_872,
}
CLASSIFIERS = [
    "alexnet",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v2",
]
# The fixture folder also holds the detectors' layouts (tests/test_detection_fixtures.py checks those).
FIXTURE_MODELS = sorted(p.stem for p in FIXTURES.glob("*.json") if p.stem in CLASSIFIERS)

torch.set_num_threads(2)


def build_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return get_entry(name).builder(**get_entry(name).builder_kwargs)


def layout(model: nn.Module) -> list[list]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def test_fixtures_cover_every_classifier_torchvision_ships():
    # vgg13_bn is the only builder without a dumped fixture; it is checked by derivation below.
    assert set(FIXTURE_MODELS) == set(CLASSIFIERS) - {"vgg13_bn"}
    assert not (FIXTURES / "vgg13_bn.json").exists()


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_state_dict_matches_torchvision(name: str):
    fx = load_fixture(name)
    ours = layout(build_meta(name))
    theirs = fx["state_dict"]
    if ours != theirs:  # name the first difference instead of dumping two long lists
        first = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
        )
        pytest.fail(
            f"{name}: {len(ours)} vs {len(theirs)} entries; first difference at {first}: "
            f"ours={ours[first] if first < len(ours) else None} "
            f"torchvision={theirs[first] if first < len(theirs) else None}"
        )
    assert num_params(build_meta(name)) == fx["num_params"]


@pytest.mark.parametrize("name,count", sorted(EXPECTED_PARAMS.items()))
def test_parameter_counts(name: str, count: int):
    assert num_params(build_meta(name)) == count
    assert load_fixture(name)["num_params"] == count


def test_vgg13_bn_is_vgg13_plus_one_batchnorm_per_conv():
    plain, bn = build_meta("vgg13"), build_meta("vgg13_bn")
    convs = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in bn.features if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [b.num_features for b in bns]
    assert num_params(bn) == num_params(plain) + sum(2 * c.out_channels for c in convs)
    # Same key scheme as the fixture-checked vgg11_bn/vgg16_bn: conv, bn, relu triplets in one Sequential.
    keys = [k for k, *_ in layout(bn)]
    assert keys[:7] == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
        "features.1.running_mean",
        "features.1.running_var",
        "features.1.num_batches_tracked",
    ]


def test_registry_entries():
    assert set(CLASSIFIERS) <= set(list_models(task=Task.classification))
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert (labels[0], labels[281], labels[285], labels[967], labels[999]) == (
        "tench",
        "tabby",
        "Egyptian cat",
        "espresso",
        "toilet tissue",
    )
    for name in CLASSIFIERS:
        entry = get_entry(name)
        assert entry.task == Task.classification
        assert entry.input_shape == (3, 224, 224)
        assert entry.preprocess == IMAGENET_PREPROCESS
        assert entry.output_names == ("logits",)
        assert tuple(entry.labels()) == labels
        assert entry.description
        # Only MobileNetV2 has real weights; nothing random is served by default.
        assert entry.has_weights == (name == "mobilenet_v2")
        assert entry.served_by_default == (name == "mobilenet_v2")


def test_get_model_refuses_default_weights_for_architecture_only_models():
    with pytest.raises(ValueError, match="no trained weights"):
        get_model("resnet18")


def _torchvision_layout_checkpoint(name: str, path: Path) -> dict[str, torch.Tensor]:
    """A state dict built purely from torchvision's key/shape facts, as a user's checkpoint would be."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype in load_fixture(name)["state_dict"]:
        if dtype == "int64":
            state[key] = torch.tensor(7, dtype=torch.int64)
        else:
            state[key] = torch.randn(shape, generator=gen)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_checkpoint_loads_strict(name: str, tmp_path: Path):
    state = _torchvision_layout_checkpoint(name, tmp_path / f"{name}.pth")
    model = get_model(name, weights=tmp_path / f"{name}.pth")
    assert not model.training
    loaded = model.state_dict()
    for key in (next(iter(state)), list(state)[-1]):
        assert torch.equal(loaded[key], state[key])


def test_strict_load_rejects_a_checkpoint_missing_a_key(tmp_path: Path):
    state = _torchvision_layout_checkpoint("resnet18", tmp_path / "r18.pth")
    del state["layer4.1.bn2.running_var"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="layer4.1.bn2.running_var"):
        get_model("resnet18", weights=tmp_path / "broken.pth")


@pytest.mark.parametrize("name", ["alexnet", "resnet18", "resnet34", "resnet50", "mobilenet_v2"])
def test_forward_shape(name: str):
    model = get_model(name, weights=None)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet101"])
def test_forward_shape_large(name: str):
    model = get_model(name, weights=None)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# The two biggest models are built (really, not on meta) once for the whole module.
@pytest.fixture(scope="module")
def vgg19_model() -> nn.Module:
    return get_model("vgg19", weights=None)


@pytest.fixture(scope="module")
def resnet152_model() -> nn.Module:
    return get_model("resnet152", weights=None)


@pytest.mark.slow
def test_vgg19_real_build_and_forward(vgg19_model: nn.Module):
    assert num_params(vgg19_model) == EXPECTED_PARAMS["vgg19"]
    assert layout(vgg19_model) == load_fixture("vgg19")["state_dict"]
    with torch.no_grad():
        out = vgg19_model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    # torchvision's init scheme: FC weights N(0, 0.01), biases zero.
    fc = vgg19_model.get_submodule("classifier.0")
    assert isinstance(fc, nn.Linear)
    with torch.no_grad():
        assert abs(float(fc.weight.std()) - 0.01) < 1e-3 and float(fc.bias.abs().max()) == 0.0


@pytest.mark.slow
def test_resnet152_real_build_and_forward(resnet152_model: nn.Module):
    assert num_params(resnet152_model) == EXPECTED_PARAMS["resnet152"]
    with torch.no_grad():
        out = resnet152_model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_inputs_other_than_224_work_thanks_to_adaptive_pooling():
    with torch.no_grad():
        assert get_model("alexnet", weights=None)(torch.randn(1, 3, 160, 200)).shape == (1, 1000)
        assert get_model("mobilenet_v2", weights=None)(torch.randn(1, 3, 96, 128)).shape == (1, 1000)


# --- design facts ------------------------------------------------------------------------------


def test_alexnet_overlapping_pooling_relu_and_dropout():
    model = build_meta("alexnet")
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size > p.stride for p in pools)  # overlapping windows
    feats = list(model.features)
    assert all(isinstance(feats[i + 1], nn.ReLU) for i, m in enumerate(feats) if isinstance(m, nn.Conv2d))
    dropouts = [m for m in model.classifier if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2 and all(d.p == 0.5 for d in dropouts)
    # Nearly all weights live in the fully connected head that dropout regularises.
    fc = sum(p.numel() for p in model.classifier.parameters())
    assert fc / num_params(model) > 0.95


def test_vgg_uses_only_3x3_convs_and_two_of_them_see_5x5_with_fewer_weights():
    for name in ("vgg11", "vgg19_bn"):
        convs = [m for m in build_meta(name).modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)

    c = 8
    two_3x3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 3, padding=1, bias=False))
    one_5x5 = nn.Conv2d(c, c, 5, padding=2, bias=False)
    assert num_params(two_3x3) == 18 * c * c and num_params(one_5x5) == 25 * c * c
    # Receptive field measured, not assumed: which input pixels does the centre output depend on?
    x = torch.randn(1, c, 11, 11, requires_grad=True)
    two_3x3(x)[0, :, 5, 5].sum().backward()
    rows, cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1))).unbind(1)
    assert (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1) == (5, 5)


def test_resnet_blocks_cost_and_identity_shortcut():
    c = 64
    basic = BasicBlock(c, c)
    bottleneck = Bottleneck(4 * c, c)

    def conv_weights(block: nn.Module) -> int:
        return sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))

    assert conv_weights(basic) == 18 * c * c
    assert conv_weights(bottleneck) == 17 * c * c  # 1x1 reduce + 3x3 + 1x1 expand on 4c channels
    assert bottleneck.conv2.stride == (1, 1) and Bottleneck(4 * c, c, stride=2).conv2.stride == (2, 2)

    # With the residual branch's last BN zeroed the block is exactly relu(identity).
    model = resnet18(zero_init_residual=True).eval()
    block = model.layer1[0]
    assert block.downsample is None  # shape unchanged: the shortcut is parameter-free
    x = torch.randn(2, 64, 14, 14)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(x))
    assert model.layer2[0].downsample is not None  # stride 2 + more channels: projection shortcut


def test_mobilenetv2_inverted_residuals_with_linear_bottlenecks() -> None:
    model = build_meta("mobilenet_v2")
    assert isinstance(model, MobileNetV2)
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    for block in blocks:
        depthwise = [m for m in block.conv.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(depthwise) == 1 and depthwise[0].groups == depthwise[0].in_channels == depthwise[0].out_channels
        # Linear bottleneck: the projection ends in conv + BN, no activation.
        assert isinstance(block.conv[-2], nn.Conv2d) and isinstance(block.conv[-1], nn.BatchNorm2d)
        first = block.conv[0]
        assert isinstance(first, nn.Sequential)  # a Conv2dNormActivation: conv, BN, activation
        expand = first[0]
        assert isinstance(expand, nn.Conv2d)
        if expand.kernel_size == (1, 1):  # inverted: expand thin -> wide before the depthwise conv
            assert expand.out_channels == 6 * expand.in_channels
    assert sum(b.use_res_connect for b in blocks) == 10
    assert all(isinstance(m, nn.ReLU6) for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6)))


def test_make_divisible():
    assert _make_divisible(32 * 1.0, 8) == 32
    assert _make_divisible(32 * 0.75, 8) == 24
    assert _make_divisible(16 * 0.35, 8) == 8  # never below the divisor
    assert _make_divisible(10, 8) == 16  # rounding to 8 would drop 20% of the channels
    assert _make_divisible(1280 * 1.4, 8) == 1792
    thin = MobileNetV2(width_mult=0.5)
    assert thin.features[0][0].out_channels == 16 and thin.last_channel == 1280
    with torch.no_grad():
        assert thin.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
