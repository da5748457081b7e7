"""Encoded image bytes -> an upright 8-bit RGB or L picture, refusing what must not be decoded.

The vision API takes images from the network, so this is the one place where untrusted bytes meet an
image decoder. The order matters: identify the format and read the header size lazily, refuse a
header that claims more pixels than allowed (a decompression bomb costs nothing to send and gigabytes
to decode), and only then decode. Everything that goes wrong becomes an `ImageDecodeError` naming the
image's index in its request and a machine-readable reason, so one bad image never loses the others.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from cnncore.preprocess import Geometry, preprocess
from cnncore.spec import PreprocessSpec

# 40 Mpx: a 50-Mpx camera photo is still refused, but every phone photo is accepted. Below Pillow's
# own warning threshold (89 Mpx), so Pillow's global guard never fires first for legitimate sizes.
DEFAULT_MAX_PIXELS = 40_000_000
_EXIF_ORIENTATION = 0x0112


def accepted_formats() -> tuple[str, ...]:
    """Formats the vision API decodes. WebP only where this Pillow was built with libwebp."""
    return ("JPEG", "PNG", "WEBP") if features.check("webp") else ("JPEG", "PNG")


ACCEPTED_FORMATS = accepted_formats()


class ImageErrorReason(StrEnum):
    # Values mirror protos/vision.proto ImageError.Reason names.
    EMPTY = "EMPTY"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    CORRUPT = "CORRUPT"
    TRUNCATED = "TRUNCATED"
    TOO_LARGE = "TOO_LARGE"


class ImageDecodeError(ValueError):
    """One image of a request could not be turned into pixels; `str()` names the index and reason."""

    def __init__(self, index: int, reason: ImageErrorReason, detail: str) -> None:
        self.index = index
        self.reason = reason
        self.detail = detail
        super().__init__(f"image {index}: {reason.value}: {detail}")


def _identify_unsupported(data: bytes) -> str | None:
    """Name the format of bytes we refuse to decode (GIF, TIFF, BMP, ...), or None if unrecognised.

    Only the header is read; this exists so a client sending a TIFF hears "TIFF is not accepted"
    rather than "corrupt".
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:  # any failure here just means "not a known image"
        return None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any decoded mode -> 'RGB' or 'L' with the right meaning.

    Pillow's own convert() clips 16-bit grey to 255 instead of scaling, and drops alpha revealing
    whatever colour hides under transparent pixels; both would feed the model a different picture
    than the one a person sees.
    """
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG). Mode "I" holds the same 16-bit samples in 32-bit ints.
        arr = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((arr * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8), mode="L")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray((arr.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on white: what an image viewer shows, and a light background keeps
        # light-on-dark models (inverted Fashion-MNIST) seeing a dark background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, rgba)
        return out.convert("L" if mode in ("LA", "La") else "RGB")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV: Pillow converts these correctly


def _resized_size(spec: PreprocessSpec, width: int, height: int) -> tuple[int, int]:
    """The size `preprocess` resizes a width x height picture to, before any crop or padding."""
    h, w = spec.input_size
    if spec.resize == "stretch":
        return w, h
    if spec.resize == "shorter_side_then_center_crop":
        s = (spec.resize_shorter_side or min(h, w)) / min(width, height)
    else:  # letterbox
        s = min(w / width, h / height)
    return math.ceil(width * s), math.ceil(height * s)


def _decode(
    data: bytes, index: int, max_pixels: int, spec: PreprocessSpec | None
) -> tuple[Image.Image, tuple[int, int]]:
    """(upright 8-bit picture, upright full-resolution size). With `spec`, a JPEG much larger than the
    model needs is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling): a 12-Mpx phone photo
    then costs a fraction of a full decode, and the picture stays at least as large as `preprocess`
    will resize it to, so quality is unchanged."""
    if not data:
        raise ImageDecodeError(index, ImageErrorReason.EMPTY, "no bytes (empty image)")
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, beyond ours
        raise ImageDecodeError(index, ImageErrorReason.TOO_LARGE, str(exc)) from None
    except UnidentifiedImageError:
        other = _identify_unsupported(data)
        if other is not None:
            raise ImageDecodeError(
                index,
                ImageErrorReason.UNSUPPORTED_FORMAT,
                f"{other} images are not accepted; send one of {', '.join(ACCEPTED_FORMATS)}",
            ) from None
        raise ImageDecodeError(
            index, ImageErrorReason.CORRUPT, f"not a recognisable {'/'.join(ACCEPTED_FORMATS)} image"
        ) from None
    except Exception as exc:  # a header the plugin recognised but could not parse
        raise ImageDecodeError(index, ImageErrorReason.CORRUPT, f"unreadable header: {exc}") from None

    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(index, ImageErrorReason.CORRUPT, f"header claims {width}x{height} pixels")
        if width * height > max_pixels:
            raise ImageDecodeError(
                index,
                ImageErrorReason.TOO_LARGE,
                f"header claims {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            )
        try:
            # Orientations 5-8 turn the picture by 90 degrees: the upright size is the stored one swapped.
            # (Reading EXIF may decode a PNG whole, as its eXIf chunk can follow the pixels.)
            sideways = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            full_size = (height, width) if sideways else (width, height)
            if spec is not None and img.format == "JPEG":
                needed = _resized_size(spec, *full_size)
                img.draft(img.mode, needed[::-1] if sideways else needed)
            img.load()
        except Exception as exc:
            text = str(exc)
            truncated = isinstance(exc, EOFError) or "truncated" in text or "end of file" in text.lower()
            reason = ImageErrorReason.TRUNCATED if truncated else ImageErrorReason.CORRUPT
            raise ImageDecodeError(
                index, reason, f"{img.format} data could not be decoded: {text or type(exc).__name__}"
            ) from None
        # EXIF orientation: phones store pixels sideways and a tag saying so; the model and the box
        # coordinates must refer to the picture as people see it.
        upright = ImageOps.exif_transpose(img)
        return _to_8bit(upright), full_size


def decode_image(data: bytes, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one encoded image into an upright 'RGB' or 'L' PIL image at full resolution.

    Raises ImageDecodeError (never anything else for bad bytes) naming `index` and the reason.
    """
    return _decode(data, index, max_pixels, None)[0]


@dataclass(frozen=True)
class PreparedImage:
    """One request image, decoded and preprocessed: the model input plus the way back to pixels."""

    index: int
    tensor: np.ndarray  # CHW float32 (uint8 pixels with pixels=True), the model's input without the batch dimension
    geometry: Geometry


def prepare_image(
    data: bytes, spec: PreprocessSpec, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, pixels: bool = False
) -> PreparedImage:
    """Decode + the one shared preprocessing (cnncore.preprocess; `pixels`: stop at uint8 pixels for a
    model that normalizes in its graph). Runs in a worker thread.

    The geometry always refers to the full-resolution upright picture, even when it was decoded smaller.
    """
    image, (full_w, full_h) = _decode(data, index, max_pixels, spec)
    tensor, geo = preprocess(image, spec, pixels=pixels)
    if (geo.orig_width, geo.orig_height) != (full_w, full_h):
        fx, fy = geo.orig_width / full_w, geo.orig_height / full_h
        geo = Geometry(geo.scale_x * fx, geo.scale_y * fy, geo.pad_x, geo.pad_y, full_w, full_h)
    return PreparedImage(index=index, tensor=tensor, geometry=geo)
