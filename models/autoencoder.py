"""A convolutional autoencoder for Fashion-MNIST: image -> latent vector -> image.

Design. The encoder halves the resolution twice with stride-2 3x3 convolutions (28 -> 14 -> 7) and
flattens into a small latent vector (32 numbers for 784 pixels): the bottleneck forces the network to
keep what varies across garments (silhouette, sleeves, brightness) and drop pixel noise. The decoder
mirrors it with transposed convolutions. Their kernel (4) is divisible by their stride (2), so every
output pixel receives the same number of kernel taps: an uneven overlap (k=3, s=2) is what paints the
checkerboard artefacts of learned upsampling (Odena et al., 2016). A sigmoid keeps the reconstruction in
[0, 1], the same scale as the input pixels, so reconstruction MSE is measured in pixel units.

Two registry entries share one checkpoint: the full model (outputs "latent" and "reconstruction") and
the encoder alone ("latent"), so a client can ask for compact features without paying for the decoder.
An exported model's reconstruction MSE: `python -m export.evaluate.autoencoder --onnx PATH`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnncore.spec import PreprocessSpec, Task
from models.registry import ModelEntry, register

LATENT_DIM = 32
IMAGE_SIZE = 28
WEIGHTS_FILE = Path(__file__).parent / "weights" / "autoencoder_fashion_mnist.safetensors"

# The autoencoder sees raw [0,1] pixels in Fashion-MNIST's own convention (light garment on black), so the
# reconstruction is directly comparable with the input and the MSE is in pixel units.
PREPROCESS = PreprocessSpec(input_size=(IMAGE_SIZE, IMAGE_SIZE), color="L", resize="stretch", mean=(0.0,), std=(1.0,))


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ConvEncoder(nn.Module):
    """[N, 1, 28, 28] in [0,1] -> latent [N, latent_dim]."""

    def __init__(self, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 16, 2),  # 14x14
            _conv_bn_relu(16, 32, 2),  # 7x7
        )
        self.fc = nn.Linear(32 * 7 * 7, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class ConvDecoder(nn.Module):
    """latent [N, latent_dim] -> image [N, 1, 28, 28] in [0,1]."""

    def __init__(self, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.fc = nn.Linear(latent_dim, 32 * 7 * 7)
        self.upsample = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1, bias=False),  # 7 -> 14: (7-1)*2 - 2 + 4 = 14
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, bias=False),  # 14 -> 28
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 1, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.upsample(self.fc(z).unflatten(1, (32, 7, 7))))


class ConvAutoencoder(nn.Module):
    """forward returns (latent, reconstruction), the two served outputs, in that order."""

    def __init__(self, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.encoder = ConvEncoder(latent_dim)
        self.decoder = ConvDecoder(latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


def _load_state(path: Path = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"autoencoder checkpoint missing: {path}; train it with models/training/train_autoencoder.py"
        )
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_autoencoder_weights(model: nn.Module) -> str:
    model.load_state_dict(_load_state(), strict=True)
    return f"trained here on Fashion-MNIST ({WEIGHTS_FILE.name})"


def load_encoder_weights(model: nn.Module) -> str:
    # The encoder entry is the autoencoder's encoder half: same checkpoint, keys under "encoder.".
    state = {k.removeprefix("encoder."): v for k, v in _load_state().items() if k.startswith("encoder.")}
    model.load_state_dict(state, strict=True)
    return f"encoder half of the Fashion-MNIST autoencoder ({WEIGHTS_FILE.name})"


def _register() -> None:
    common: dict[str, Any] = dict(
        input_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
        preprocess=PREPROCESS,
        served_by_default=True,
        example_inputs=lambda n: torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE),
    )
    register(
        ModelEntry(
            name="fashion_mnist_autoencoder",
            builder=ConvAutoencoder,
            task=Task.autoencoder,
            weights=load_autoencoder_weights,
            description=f"convolutional autoencoder, {LATENT_DIM}-d latent, trained on Fashion-MNIST",
            output_names=("latent", "reconstruction"),
            **common,
        )
    )
    register(
        ModelEntry(
            name="fashion_mnist_encoder",
            builder=ConvEncoder,
            task=Task.encoder,
            weights=load_encoder_weights,
            description=f"encoder half of the Fashion-MNIST autoencoder: image -> {LATENT_DIM}-d latent features",
            output_names=("latent",),
            **common,
        )
    )


_register()


# ---- data helpers shared by training and the exported model's evaluation ------------------------------


def mean_image_baseline(train_images: np.ndarray, test_images: np.ndarray) -> float:
    """MSE of predicting every test image as the training set's mean image (pixels in [0,1])."""
    mean = train_images.astype(np.float32).mean(axis=0) / 255.0
    return float(np.mean((test_images.astype(np.float32) / 255.0 - mean) ** 2))


def preprocess_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> model input [N, 1, 28, 28] through the served preprocessing spec."""
    from PIL import Image

    from cnncore.preprocess import preprocess

    return np.stack([preprocess(Image.fromarray(img, mode="L"), PREPROCESS)[0] for img in images])
