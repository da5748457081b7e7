"""A client for the vision API (protos/vision.proto): pictures in, answers out.

Images may be given as encoded bytes, a path, or a PIL image (sent as PNG, lossless). Responses are the
generated messages themselves (typed, documented in vision.proto); a few helpers turn their PNG
fields back into pixels. Per-image failures stay in `result.image.error` (see `failures`) so one bad
picture in a batch does not hide the others' answers; request-level failures raise
`InferenceServerError` with the gRPC status.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from client.channel import AsyncClient, BlockingClient
from cnncore.postprocess import DEFAULT_SCORE_THRESHOLD
from protos import vision_pb2 as vpb
from protos import vision_pb2_grpc as vpb_grpc

ImageInput = bytes | bytearray | memoryview | str | PathLike | Image.Image


def encode_image(image: ImageInput) -> bytes:
    """bytes pass through untouched (the server sees exactly what the user has); paths are read;
    PIL images become PNG so nothing is lost on the way."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()
    return Path(image).read_bytes()


def _encode_all(images: ImageInput | Sequence[ImageInput]) -> list[bytes]:
    if isinstance(images, (bytes, bytearray, memoryview, str, PathLike, Image.Image)):
        images = [images]
    return [encode_image(img) for img in images]


def failures(results: Iterable[Any]) -> list[str]:
    """Messages of the images that failed in a response's `results` ([] when all were answered)."""
    return [r.image.error.message for r in results if r.image.HasField("error")]


def mask_array(result: vpb.SegmentResult) -> np.ndarray:
    """A SegmentResult's mask as a uint8 [height, width] array of class indices."""
    return np.asarray(Image.open(io.BytesIO(result.mask_png)))


def png_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _request(
    kind: str, model_name: str, images: ImageInput | Sequence[ImageInput], model_version: str, **options: Any
) -> Any:
    request_type = getattr(vpb, f"{kind}Request")
    return request_type(model_name=model_name, model_version=model_version, images=_encode_all(images), **options)


class VisionClient(BlockingClient):
    """Blocking vision client; shares a channel with `InferenceClient` if given one."""

    stub_type = vpb_grpc.VisionServiceStub

    def classify(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        top_k: int = 5,
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.ClassifyResponse:
        return self._call("Classify", _request("Classify", model_name, images, model_version, top_k=top_k), timeout)

    def detect(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        max_detections: int = 0,
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.DetectResponse:
        request = _request(
            "Detect", model_name, images, model_version, score_threshold=score_threshold, max_detections=max_detections
        )
        return self._call("Detect", request, timeout)

    def segment(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.SegmentResponse:
        return self._call("Segment", _request("Segment", model_name, images, model_version), timeout)

    def encode(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.EncodeResponse:
        return self._call("Encode", _request("Encode", model_name, images, model_version), timeout)

    def reconstruct(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.ReconstructResponse:
        return self._call("Reconstruct", _request("Reconstruct", model_name, images, model_version), timeout)


class AsyncVisionClient(AsyncClient):
    """asyncio vision client over grpc.aio, the same methods as `VisionClient`, awaited."""

    stub_type = vpb_grpc.VisionServiceStub

    async def classify(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        top_k: int = 5,
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.ClassifyResponse:
        request = _request("Classify", model_name, images, model_version, top_k=top_k)
        return await self._call("Classify", request, timeout)

    async def detect(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        max_detections: int = 0,
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.DetectResponse:
        request = _request(
            "Detect", model_name, images, model_version, score_threshold=score_threshold, max_detections=max_detections
        )
        return await self._call("Detect", request, timeout)

    async def segment(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.SegmentResponse:
        return await self._call("Segment", _request("Segment", model_name, images, model_version), timeout)

    async def encode(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.EncodeResponse:
        return await self._call("Encode", _request("Encode", model_name, images, model_version), timeout)

    async def reconstruct(
        self,
        model_name: str,
        images: ImageInput | Sequence[ImageInput],
        model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.ReconstructResponse:
        return await self._call("Reconstruct", _request("Reconstruct", model_name, images, model_version), timeout)
