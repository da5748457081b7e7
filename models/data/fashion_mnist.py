"""Fashion-MNIST (Xiao et al. 2017) from the IDX files of Debian's `dataset-fashion-mnist` package.

Images are 28x28 grayscale product photos, inverted: a light garment on a black background.
Read with numpy only, so evaluation code does not need torch to load the data.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_DIR"

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Pixel statistics of the 60k training images scaled to [0,1]; training and serving normalise with these.
MEAN = 0.2860
STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMNISTMissing(FileNotFoundError):
    """The IDX files are not where we looked."""


def data_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def available(directory: Path | None = None) -> bool:
    d = directory or data_dir()
    return all((d / name).is_file() for pair in _FILES.values() for name in pair)


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    # IDX: 2 zero bytes, a type code (0x08 = uint8), the number of dims, then big-endian int32 sizes.
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    if ndim != expected_dims:
        raise ValueError(f"{path}: expected {expected_dims} dims, file has {ndim}")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, payload has {data.size} bytes")
    return data.reshape(shape).copy()  # frombuffer is read-only; callers (torch) want writable arrays


def load(split: Literal["train", "test"], directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) for `split`."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = Path(directory) if directory is not None else data_dir()
    img_name, lbl_name = _FILES[split]
    missing = [str(d / n) for n in (img_name, lbl_name) if not (d / n).is_file()]
    if missing:
        raise FashionMNISTMissing(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install the Debian package "
            f"`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or point {ENV_VAR} at a "
            "directory holding the four *-ubyte.gz files."
        )
    images = _read_idx(d / img_name, 3)
    labels = _read_idx(d / lbl_name, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{d}: {len(images)} images but {len(labels)} labels")
    return images, labels
