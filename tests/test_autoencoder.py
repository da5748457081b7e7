"""Fashion-MNIST convolutional autoencoder: shapes, the shared checkpoint of the two entries, export +
parity + TensorRT lint, and reconstruction MSE through ONNX Runtime against the mean-image baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import models
from models.autoencoder import (
    IMAGE_SIZE,
    LATENT_DIM,
    WEIGHTS_FILE,
    ConvAutoencoder,
    mean_image_baseline,
    preprocess_images,
)
from models.data import fashion_mnist
from models.registry import get_entry
from models.segmentation.encoder_decoder import transposed_conv_output_size

NAMES = ("fashion_mnist_autoencoder", "fashion_mnist_encoder")
needs_data = pytest.mark.skipif(
    not fashion_mnist.available(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)"
)


def test_shapes_and_range() -> None:
    model = ConvAutoencoder().eval()
    with torch.no_grad():
        latent, recon = model(torch.rand(5, 1, IMAGE_SIZE, IMAGE_SIZE))
    assert latent.shape == (5, LATENT_DIM) and recon.shape == (5, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert recon.min() >= 0 and recon.max() <= 1  # sigmoid: same scale as the input pixels


def test_decoder_transposed_convs_double_exactly() -> None:
    sizes = [7]
    for layer in ConvAutoencoder().decoder.upsample:
        if isinstance(layer, nn.ConvTranspose2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
            assert isinstance(p, int)  # padding given in pixels, not "same"/"valid"
            assert k % s == 0  # even overlap: no checkerboard pattern
            sizes.append(transposed_conv_output_size(sizes[-1], k, s, p))
    assert sizes == [7, 14, 28]


def test_entries_share_one_checkpoint() -> None:
    auto, enc = (models.get_model(n) for n in NAMES)
    x = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(auto(x)[0], enc(x))
    assert get_entry(NAMES[0]).output_names == ("latent", "reconstruction")
    assert get_entry(NAMES[1]).output_names == ("latent",)
    assert {get_entry(n).task.value for n in NAMES} == {"autoencoder", "encoder"}
    assert all(get_entry(n).served_by_default for n in NAMES)
    assert WEIGHTS_FILE.stat().st_size < 10_000_000


def test_preprocessing_is_plain_pixel_scaling() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(preprocess_images(images)[:, 0], images / 255.0, atol=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    from export.onnx_export import export_onnx

    out = {}
    for name in NAMES:
        model = models.get_model(name)
        path = tmp_path_factory.mktemp(name) / "model.onnx"
        export_onnx(model, get_entry(name), path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_export_parity_and_tensorrt_lint(exported, name: str) -> None:
    from export.eager_parity import check_parity
    from export.trt_lint import check_model

    model, path = exported[name]
    report = check_parity(model, get_entry(name), path, batch_sizes=[1, 2, 5])
    assert report.ok, report.failure_message()
    check_model(path)


@needs_data
def test_reconstruction_mse_far_below_mean_image_baseline(exported, capsys) -> None:
    from export.evaluate.autoencoder import main, onnx_reconstruction_mse

    _, path = exported["fashion_mnist_autoencoder"]
    train, _ = fashion_mnist.load("train")
    test, _ = fashion_mnist.load("test")
    subset = test[:1000]
    mse = onnx_reconstruction_mse(path, subset)
    baseline = mean_image_baseline(train, subset)
    assert mse < 0.5 * baseline, (mse, baseline)
    # The evaluation command reports the same numbers.
    assert main(["--onnx", str(path), "--limit", "1000"]) == 0
    printed = capsys.readouterr().out
    assert f"{mse:.5f}" in printed and f"{baseline:.5f}" in printed
