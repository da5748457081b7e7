"""The one implementation of `PreprocessSpec`: PIL image -> model input (numpy, CHW float32, or CHW
uint8 pixels for models that normalize inside their graph).

Torch-free so the server, the tests, the evaluation commands and training all preprocess identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from cnncore.spec import PreprocessSpec


@dataclass(frozen=True)
class Geometry:
    """Maps model-input pixels back to original-image pixels: orig = (model - pad) / scale."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    orig_width: int
    orig_height: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """boxes [..., 4] as (x1, y1, x2, y2) in model-input pixels -> original pixels, clipped."""
        out = np.asarray(boxes, dtype=np.float32).copy()
        out[..., 0::2] = (out[..., 0::2] - self.pad_x) / self.scale_x
        out[..., 1::2] = (out[..., 1::2] - self.pad_y) / self.scale_y
        out[..., 0::2] = out[..., 0::2].clip(0, self.orig_width)
        out[..., 1::2] = out[..., 1::2].clip(0, self.orig_height)
        return out


def preprocess(image: Image.Image, spec: PreprocessSpec, *, pixels: bool = False) -> tuple[np.ndarray, Geometry]:
    """Return (CHW float32 array, geometry). `image` must already be decoded and upright.

    `pixels=True` stops after the geometry: CHW uint8 pixels, for models exported with
    `--input-dtype uint8`, whose graph applies the scaling, `invert`, `mean` and `std` itself."""
    height, width = spec.input_size
    img = image.convert(spec.color)
    ow, oh = img.size
    pad_x = pad_y = 0.0
    if spec.resize == "stretch":
        img = img.resize((width, height), Image.Resampling.BILINEAR)
        sx, sy = width / ow, height / oh
    elif spec.resize == "shorter_side_then_center_crop":
        short = spec.resize_shorter_side or min(height, width)
        s = short / min(ow, oh)
        rw, rh = max(width, round(ow * s)), max(height, round(oh * s))
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
        left, top = (rw - width) // 2, (rh - height) // 2
        img = img.crop((left, top, left + width, top + height))
        sx, sy = rw / ow, rh / oh
        pad_x, pad_y = -float(left), -float(top)
    elif spec.resize == "letterbox":
        s = min(width / ow, height / oh)
        rw, rh = max(1, round(ow * s)), max(1, round(oh * s))
        resized = img.resize((rw, rh), Image.Resampling.BILINEAR)
        fill = round(spec.pad_value * 255)
        canvas = Image.new(spec.color, (width, height), fill if spec.color == "L" else (fill,) * 3)
        pad_x, pad_y = (width - rw) // 2, (height - rh) // 2
        canvas.paste(resized, (pad_x, pad_y))
        img = canvas
        sx, sy = rw / ow, rh / oh
        pad_x, pad_y = float(pad_x), float(pad_y)
    else:  # pragma: no cover - pydantic restricts the values
        raise ValueError(f"unknown resize policy {spec.resize!r}")

    if pixels:
        px = np.asarray(img, dtype=np.uint8)
        px = px[:, :, None] if px.ndim == 2 else px
        return np.ascontiguousarray(px.transpose(2, 0, 1)), Geometry(sx, sy, pad_x, pad_y, ow, oh)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if spec.invert:
        arr = 1.0 - arr
    mean = np.asarray(spec.mean[: arr.shape[2]], dtype=np.float32)
    std = np.asarray(spec.std[: arr.shape[2]], dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), Geometry(sx, sy, pad_x, pad_y, ow, oh)
