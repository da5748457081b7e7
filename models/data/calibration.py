"""Real, offline pictures of each default model's task, for INT8 calibration and the accuracy gate.

Two disjoint sets per task: *calibration* (activation ranges for static quantization; training data
where the task has any) and *held-out* (what the gate compares FP32 and INT8 on). Every picture goes
through the served preprocessing (cnncore.preprocess with the model's PreprocessSpec), so the ranges
are those the server will feed. Deterministic by seed; torch-free (numpy, Pillow, scikit-image).

- Fashion-MNIST models: calibration = training images (a seeded sample), held-out = the test split.
- Shapes detector / segmenters: generated pictures; calibration from training seeds (< 10**6, as
  models/training/train_detector.py and train_segmenter.py draw them), held-out from the evaluators'
  held-out seeds (models/detection/evaluate.py, models/segmentation/evaluate.py).
- ImageNet classifiers: natural photos shipped with scikit-image and scikit-learn (no download).
  Calibration: CALIBRATION_PHOTOS, each as CALIBRATION_CROPS random crops; held-out: HELDOUT_PHOTOS,
  a disjoint set of photos, each as HELDOUT_CROPS crops. ImageNet itself is not available offline.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from cnncore.preprocess import preprocess
from cnncore.spec import PreprocessSpec

# Training seeds of the shapes models are drawn below 10**6 (train_detector.py, train_segmenter.py).
SHAPES_TRAIN_SEED_LIMIT = 10**6
SHAPES_CALIBRATION_SIZE = 32
FASHION_CALIBRATION_SIZE = 256
# (module, name): scikit-image's skimage.data functions, or ("sklearn", file) for load_sample_image.
CALIBRATION_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "chelsea"),
    ("skimage", "coffee"),
    ("skimage", "astronaut"),
    ("skimage", "rocket"),
    ("sklearn", "china.jpg"),
)
HELDOUT_PHOTOS: tuple[tuple[str, str], ...] = (
    ("sklearn", "flower.jpg"),
    ("skimage", "stereo_motorcycle"),
    ("skimage", "camera"),
    ("skimage", "coins"),
    ("skimage", "clock"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "brick"),
    ("skimage", "gravel"),
    ("skimage", "grass"),
    ("skimage", "moon"),
    ("skimage", "retina"),
)
CALIBRATION_CROPS = 8
HELDOUT_CROPS = 24


class CalibrationDataMissing(FileNotFoundError):
    """No real data for this model's task on this machine; the message names what to install."""


def _photo(source: str, name: str) -> Image.Image:
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(name)
    else:
        import skimage.data

        arr = getattr(skimage.data, name)()
        if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
            arr = arr[0]
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8))


def _random_crops(photo: Image.Image, n: int, rng: np.random.Generator) -> Iterator[Image.Image]:
    """Inception-style crops: 25-100% of the area, aspect 3/4..4/3, half of them mirrored; the first is
    the whole photo, as a user would send it."""
    yield photo
    w, h = photo.size
    for _ in range(n - 1):
        area = w * h * rng.uniform(0.25, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x0, y0, x0 + cw, y0 + ch))
        yield crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def photo_crops(photos: tuple[tuple[str, str], ...], crops: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    try:
        return [c for src, name in photos for c in _random_crops(_photo(src, name), crops, rng)]
    except (ImportError, AttributeError, OSError) as exc:
        raise CalibrationDataMissing(
            f"natural photos for the ImageNet classifiers come from scikit-image and scikit-learn "
            f"(the export extra and dev dependencies): {exc}"
        ) from None


def jpeg_reencoded(pictures: list[Image.Image], quality: int) -> list[Image.Image]:
    """Each picture saved as JPEG at `quality` and decoded again (the accuracy gate's imperceptible
    perturbation: FP32's answers on these measure its own noise floor)."""
    import io

    out = []
    for p in pictures:
        buf = io.BytesIO()
        p.convert("RGB").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(Image.open(buf).convert(p.mode))
    return out


def _fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    from models.data import fashion_mnist

    try:
        return fashion_mnist.load(split)  # type: ignore[arg-type]
    except fashion_mnist.FashionMNISTMissing as exc:
        raise CalibrationDataMissing(str(exc)) from None


def fashion_calibration_images(n: int = FASHION_CALIBRATION_SIZE, seed: int = 0) -> np.ndarray:
    """A seeded sample of n Fashion-MNIST training images, uint8 [n, 28, 28]."""
    images, _ = _fashion("train")
    return images[np.random.default_rng(seed).choice(len(images), size=n, replace=False)]


def shapes_calibration_pictures(n: int = SHAPES_CALIBRATION_SIZE, seed: int = 0) -> list[Image.Image]:
    """n generated pictures from training seeds, at the evaluators' assorted sizes."""
    from models.data.shapes import generate_sample
    from models.segmentation.evaluate import IMAGE_SIZES

    seeds = np.random.default_rng(seed).choice(SHAPES_TRAIN_SEED_LIMIT, size=n, replace=False)
    return [
        Image.fromarray(generate_sample(int(s), IMAGE_SIZES[i % len(IMAGE_SIZES)]).image) for i, s in enumerate(seeds)
    ]


def preprocess_all(pictures: list[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """The served preprocessing of each picture, stacked: float32 [n, C, H, W]."""
    return np.stack([preprocess(p, spec)[0] for p in pictures]).astype(np.float32)


def fashion_pictures(images: np.ndarray, spec: PreprocessSpec) -> list[Image.Image]:
    """Dataset images as the pictures a client sends: the dataset stores light garments on black, a
    spec with `invert` expects product photos (dark on light) and inverts them itself."""
    return [Image.fromarray(255 - img if spec.invert else img, mode="L") for img in images]


def calibration_inputs(model: str, spec: PreprocessSpec) -> tuple[np.ndarray, str]:
    """(preprocessed calibration inputs, a description for model.json) for a default model.

    CalibrationDataMissing when this model has no real calibration data defined, or its data is not
    installed: quantizing on random tensors is never the fallback.
    """
    if model in ("fashion_resnet20", "fashion_mnist_autoencoder", "fashion_mnist_encoder"):
        images = fashion_calibration_images()
        return (
            preprocess_all(fashion_pictures(images, spec), spec),
            f"{len(images)} Fashion-MNIST training images (seeded sample, seed 0)",
        )
    if model == "shapes_detector" or model.startswith("shapes_segmenter"):
        pics = shapes_calibration_pictures()
        return (
            preprocess_all(pics, spec),
            f"{len(pics)} generated shapes pictures from training seeds (< 10**6, seed 0)",
        )
    if spec.resize == "shorter_side_then_center_crop" and spec.input_size == (224, 224):
        pics = photo_crops(CALIBRATION_PHOTOS, CALIBRATION_CROPS, seed=0)
        names = ", ".join(n for _, n in CALIBRATION_PHOTOS)
        return (
            preprocess_all(pics, spec),
            f"{len(pics)} natural photos ({names}; {CALIBRATION_CROPS} random crops each, seed 0)",
        )
    raise CalibrationDataMissing(
        f"{model}: no calibration data defined for this model (calibration needs real pictures of its "
        "task; random tensors would give ranges the served inputs never have)"
    )
