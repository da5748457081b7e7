"""The bad-input matrix of the image decoder, and the modes it must convert rather than reject."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cnncore.imaging import (
    ACCEPTED_FORMATS,
    ImageDecodeError,
    ImageErrorReason,
    decode_image,
    prepare_image,
)
from cnncore.spec import PreprocessSpec


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient_rgb(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2), "RGB")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def reason_of(data: bytes, index: int = 3, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, index=index, **kwargs)
    err = info.value
    assert err.index == index
    assert str(err).startswith(f"image {index}: {err.reason.value}")
    return err


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_accepted_formats_round_trip(fmt: str) -> None:
    src = gradient_rgb()
    kwargs = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    out = decode_image(encode(src, fmt, **kwargs))
    assert out.mode == "RGB" and out.size == src.size
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(src, np.int16))
    assert diff.mean() < (3 if fmt == "JPEG" else 0.5)


def test_empty() -> None:
    assert reason_of(b"").reason is ImageErrorReason.EMPTY


def test_truncated_png_and_jpeg() -> None:
    for fmt in ("PNG", "JPEG"):
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))
        data = encode(noise, fmt)
        err = reason_of(data[: len(data) // 2])
        assert err.reason is ImageErrorReason.TRUNCATED, (fmt, str(err))
        assert fmt in str(err)


def test_corrupt_bytes() -> None:
    err = reason_of(b"this is not an image at all" * 10)
    assert err.reason is ImageErrorReason.CORRUPT
    assert "not a recognisable" in str(err)


def test_corrupt_png_body() -> None:
    data = bytearray(encode(gradient_rgb(), "PNG"))
    # Flip bytes inside the compressed pixel data: the header still parses, the body does not.
    start = data.index(b"IDAT") + 8
    for i in range(start, start + 20):
        data[i] ^= 0xFF
    assert reason_of(bytes(data)).reason in (ImageErrorReason.CORRUPT, ImageErrorReason.TRUNCATED)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_unsupported_format_is_named(fmt: str) -> None:
    err = reason_of(encode(gradient_rgb(), fmt))
    assert err.reason is ImageErrorReason.UNSUPPORTED_FORMAT
    assert fmt in str(err) and "PNG" in str(err)


def test_bomb_refused_before_decoding() -> None:
    # 60000 x 60000 is also over Pillow's own global guard; both paths must say TOO_LARGE.
    assert reason_of(bomb_png(60000, 60000)).reason is ImageErrorReason.TOO_LARGE
    # Under Pillow's guard but over ours: our cap and our message.
    err = reason_of(bomb_png(8000, 6000), max_pixels=10_000_000)
    assert err.reason is ImageErrorReason.TOO_LARGE
    assert "8000x6000" in str(err) and "10000000" in str(err)


def test_grayscale_stays_grayscale() -> None:
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    out = decode_image(encode(grey))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(grey))


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    samples = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    src = Image.fromarray(samples)
    assert src.mode == "I;16"
    out = decode_image(encode(src))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), [[0, 1, 128, 255]])


def test_rgba_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # hidden red under fully transparent pixels must not show
    rgba[:4, :, 3] = 255  # top half opaque red
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"))))
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[7, 7], [255, 255, 255])


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    out = np.asarray(decode_image(encode(pal)))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 1], [10, 20, 30])


def test_exif_orientation_applied() -> None:
    # Stored landscape 60x40, left half red; orientation 6 = "rotate 90 clockwise to display".
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30, 0] = 255
    src = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(src, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (40, 60)  # displayed portrait
    pixels = np.asarray(out)
    # After a clockwise turn the stored left half (red) is the displayed top half.
    assert pixels[5, 20, 0] > 200 and pixels[55, 20, 0] < 50


def test_prepare_image_uses_model_spec() -> None:
    spec = PreprocessSpec(input_size=(28, 28), color="L", resize="stretch", mean=(0.5,), std=(0.5,), invert=True)
    prepared = prepare_image(encode(gradient_rgb(56, 84)), spec, index=2)
    assert prepared.index == 2
    assert prepared.tensor.shape == (1, 28, 28) and prepared.tensor.dtype == np.float32
    assert (prepared.geometry.orig_width, prepared.geometry.orig_height) == (56, 84)
    assert prepared.tensor.min() >= -1.0 - 1e-6 and prepared.tensor.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_reduced_decode_keeps_full_size_geometry(orientation: int) -> None:
    from cnncore.preprocess import preprocess

    stored = gradient_rgb(2000, 1200)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    spec = PreprocessSpec(input_size=(100, 100), resize="letterbox")
    prepared = prepare_image(data, spec)
    full_tensor, full_geo = preprocess(decode_image(data), spec)
    upright = (2000, 1200) if orientation == 1 else (1200, 2000)
    assert (prepared.geometry.orig_width, prepared.geometry.orig_height) == upright
    assert (full_geo.orig_width, full_geo.orig_height) == upright
    assert prepared.geometry.scale_x == pytest.approx(full_geo.scale_x, rel=0.01)
    assert prepared.geometry.scale_y == pytest.approx(full_geo.scale_y, rel=0.01)
    # A box in model pixels lands on the same original pixels either way.
    box = np.array([[10.0, 30.0, 60.0, 70.0]])
    np.testing.assert_allclose(prepared.geometry.to_original(box), full_geo.to_original(box), atol=upright[0] * 0.01)
    assert np.abs(prepared.tensor - full_tensor).mean() < 0.02
