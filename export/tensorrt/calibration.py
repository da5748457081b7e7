"""INT8 calibration data: which samples, preprocessed as served, in full batches, fed to TensorRT.

Everything but the calibrator itself is plain Python (CPU-testable).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cnncore.trt_runtime import DeviceBuffer
from export.tensorrt.errors import BuildError

CALIBRATION_DIRNAME = "calibration"  # <repo>/<model>/calibration/: images or .npy the model really sees
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def select_calibration_files(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """A deterministic, seed-chosen subset of the calibration samples in `directory`.

    Sorted first so the choice does not depend on directory order; sampled (not the first N) so a
    directory written class by class still gives a mixed set, which INT8 ranges depend on.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BuildError(f"INT8 calibration needs sample inputs in {directory} (images or .npy); none found")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"))
    if not files:
        raise BuildError(f"{directory}: no calibration samples (expected {', '.join(IMAGE_SUFFIXES)} or .npy files)")
    if count <= 0 or count >= len(files):
        return files
    return sorted(random.Random(seed).sample(files, count))


def load_calibration_samples(files: Sequence[Path], model_dir: Path, shape: Sequence[int]) -> np.ndarray:
    """Stack samples into an NCHW float32 array of per-sample `shape` (CHW).

    Images go through the model's own stored preprocessing (cnncore/preprocess.py, the one
    implementation the server uses), so calibration sees exactly what serving feeds the engine.
    """
    from PIL import Image

    from cnncore.preprocess import preprocess
    from cnncore.spec import ModelMeta

    shape = tuple(int(s) for s in shape)
    spec = None
    samples: list[np.ndarray] = []
    for path in files:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False).astype(np.float32)
            arr = arr.reshape(-1, *shape) if arr.size % int(np.prod(shape)) == 0 else None
            if arr is None:
                raise BuildError(f"{path}: array does not hold samples of shape {list(shape)}")
            samples.extend(arr)
            continue
        if spec is None:
            spec = ModelMeta.read(model_dir).preprocess
        with Image.open(path) as img:
            arr, _ = preprocess(img, spec)
        if arr.shape != shape:
            raise BuildError(f"{path}: preprocessed to {list(arr.shape)}, the model input is {list(shape)}")
        samples.append(arr)
    return np.ascontiguousarray(np.stack(samples).astype(np.float32))


def calibration_batches(samples: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Full batches only: the calibration profile has one batch size, so a short tail is dropped."""
    for start in range(0, len(samples) - batch_size + 1, batch_size):
        yield np.ascontiguousarray(samples[start : start + batch_size])


def make_calibrator(trt, batches: list[np.ndarray], input_name: str, cache_file: Path):
    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds the selected samples batch by batch from one device buffer; the resulting scale cache
        is kept next to the engine so a rebuild (e.g. new TensorRT) skips re-calibration."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = batches
            self._index = 0
            self._device = DeviceBuffer(batches[0].nbytes)

        def get_batch_size(self):
            return self._batches[0].shape[0]

        def get_batch(self, names):
            if self._index >= len(self._batches):
                return None
            self._device.copy_from_host(self._batches[self._index])
            self._index += 1
            return [self._device.ptr]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            cache_file.write_bytes(bytes(cache))

    return _EntropyCalibrator()
