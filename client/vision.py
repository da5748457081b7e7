"""A client for the vision API (protos/vision.proto): pictures in, answers out.

Images may be given as encoded bytes, a path, or a PIL image (sent as PNG, lossless). Responses are the
generated messages themselves (typed, documented in vision.proto); a few helpers turn their PNG
fields back into pixels. Per-image failures stay in `result.image.error` (see `failures`) so one bad
picture in a batch does not hide the others' answers; request-level failures raise
`InferenceServerError` with the gRPC status.
"""
from __future__ import annotations

import io
from os import PathLike
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import grpc
import numpy as np
from PIL import Image

from client.inference import CHANNEL_OPTIONS, DEFAULT_URL, InferenceServerError
from protos import vision_pb2 as vpb
from protos import vision_pb2_grpc as vpb_grpc

ImageInput = Union[bytes, str, PathLike, Image.Image]


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


class VisionClient:
    """Blocking vision client; shares a channel with `InferenceClient` if given one."""

    def __init__(self, url: str = DEFAULT_URL, channel: grpc.Channel | None = None) -> None:
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
        self._stub = vpb_grpc.VisionServiceStub(self.channel)

    def __enter__(self) -> "VisionClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def _call(self, kind: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self._stub, kind)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc(exc) from None

    def classify(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], top_k: int = 5,
        model_version: str = "", timeout: float | None = None,
    ) -> vpb.ClassifyResponse:
        return self._call("Classify", _request("Classify", model_name, images, model_version, top_k=top_k), timeout)

    def detect(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], score_threshold: float = 0.0,
        max_detections: int = 0, model_version: str = "", timeout: float | None = None,
    ) -> vpb.DetectResponse:
        request = _request(
            "Detect", model_name, images, model_version, score_threshold=score_threshold, max_detections=max_detections
        )
        return self._call("Detect", request, timeout)

    def segment(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.SegmentResponse:
        return self._call("Segment", _request("Segment", model_name, images, model_version), timeout)

    def encode(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.EncodeResponse:
        return self._call("Encode", _request("Encode", model_name, images, model_version), timeout)

    def reconstruct(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.ReconstructResponse:
        return self._call("Reconstruct", _request("Reconstruct", model_name, images, model_version), timeout)


class AsyncVisionClient:
    """asyncio vision client over grpc.aio, the same methods as `VisionClient`, awaited."""

    def __init__(self, url: str = DEFAULT_URL, channel: grpc.aio.Channel | None = None) -> None:
        self._own_channel = channel is None
        self.channel = channel or grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)
        self._stub = vpb_grpc.VisionServiceStub(self.channel)

    async def __aenter__(self) -> "AsyncVisionClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    async def _call(self, kind: str, request: Any, timeout: float | None) -> Any:
        try:
            return await getattr(self._stub, kind)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc(exc) from None

    async def classify(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], top_k: int = 5,
        model_version: str = "", timeout: float | None = None,
    ) -> vpb.ClassifyResponse:
        request = _request("Classify", model_name, images, model_version, top_k=top_k)
        return await self._call("Classify", request, timeout)

    async def detect(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], score_threshold: float = 0.0,
        max_detections: int = 0, model_version: str = "", timeout: float | None = None,
    ) -> vpb.DetectResponse:
        request = _request(
            "Detect", model_name, images, model_version, score_threshold=score_threshold, max_detections=max_detections
        )
        return await self._call("Detect", request, timeout)

    async def segment(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.SegmentResponse:
        return await self._call("Segment", _request("Segment", model_name, images, model_version), timeout)

    async def encode(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.EncodeResponse:
        return await self._call("Encode", _request("Encode", model_name, images, model_version), timeout)

    async def reconstruct(
        self, model_name: str, images: ImageInput | Sequence[ImageInput], model_version: str = "",
        timeout: float | None = None,
    ) -> vpb.ReconstructResponse:
        return await self._call("Reconstruct", _request("Reconstruct", model_name, images, model_version), timeout)
