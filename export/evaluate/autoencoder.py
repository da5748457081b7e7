"""Reconstruction MSE of an exported Fashion-MNIST autoencoder on the test set, through a serving runtime,
against the mean-image baseline.

    python -m export.evaluate.autoencoder --onnx PATH [--limit N] [--runtime openvino]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cnncore.runtime import Runner, runner
from export.evaluate.source import add_runtime_arguments
from models.autoencoder import mean_image_baseline, preprocess_images

BATCH_SIZE = 256


def reconstruction_mse(run: Runner, images: np.ndarray, batch_size: int = BATCH_SIZE) -> float:
    """Mean squared error between the preprocessed inputs and the runner's "reconstruction" output."""
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = preprocess_images(images[start : start + batch_size])
        recon = run(x)["reconstruction"]
        total += float(((recon - x) ** 2).sum())
        count += x.size
    return total / count


def onnx_reconstruction_mse(
    onnx_path: Path, images: np.ndarray, runtime: str = "onnxruntime", threads: int = 2
) -> float:
    return reconstruction_mse(runner(onnx_path, runtime, threads), images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.evaluate.autoencoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, required=True, help="exported fashion_mnist_autoencoder model.onnx")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N test images only")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    if not args.onnx.is_file():
        parser.error(f"no such file: {args.onnx}")
    from models.data import fashion_mnist

    train_images, _ = fashion_mnist.load("train")
    test_images, _ = fashion_mnist.load("test")
    if args.limit is not None:
        test_images = test_images[: args.limit]
    mse = onnx_reconstruction_mse(args.onnx, test_images, args.runtime, args.threads)
    baseline = mean_image_baseline(train_images, test_images)
    print(f"Fashion-MNIST test images: {len(test_images)}")
    print(f"reconstruction MSE ({args.runtime}): {mse:.5f}")
    print(f"mean-image baseline MSE:           {baseline:.5f}")
    print(f"ratio model / baseline:            {mse / baseline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
