"""The vision calls of the data plane: pictures in, plain answers out, through the same batchers.

Per call: resolve the model (NOT_FOUND), check its task fits the call (FAILED_PRECONDITION), then per
picture, concurrently: decode + preprocess in the data plane's one worker pool (sized by
--vision-threads, shut down with the server) with the model's stored spec, submit the picture as its
own request to the model's dynamic batcher (so pictures from every client and from ModelInfer share
batches), and postprocess onto the original picture. A picture that fails to decode gets a per-image
error; the others are answered. Failures of the model itself (queue full, deadline, backend) are the
call's error, an `InferError` like every other refusal. The answers are dataclasses; the gRPC and REST
bindings (server/bindings/grpc_vision.py, rest_vision.py) turn them into their wire forms.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from cnncore import postprocess
from cnncore.imaging import DEFAULT_MAX_PIXELS, ImageDecodeError, PreparedImage, prepare_image
from cnncore.postprocess import DEFAULT_SCORE_THRESHOLD
from cnncore.preprocess import Geometry
from cnncore.spec import ModelMeta, Task
from server import metrics
from server.dataplane.model import ServedModel
from server.dataplane.normalize import deadline_from, normalize_arrays
from server.errors import failed_precondition, internal, invalid

log = logging.getLogger("cnnserve.vision")

DEFAULT_TOP_K = 5
# Decoding and resizing release the GIL in Pillow's C code: a small pool keeps the event loop free to
# accept and answer while pictures are decoded (--vision-threads).
DEFAULT_VISION_THREADS = min(4, os.cpu_count() or 1)
UINT32_LIMIT = 2**32  # top_k and max_detections are uint32 in protos/vision.proto

# Which model tasks each call serves.
CALL_TASKS: dict[str, tuple[Task, ...]] = {
    "Classify": (Task.classification,),
    "Detect": (Task.detection,),
    "Segment": (Task.segmentation,),
    "Encode": (Task.encoder, Task.autoencoder),
    "Reconstruct": (Task.autoencoder,),
}

PREPROCESS_TIME = Histogram(
    "cnnserve_vision_preprocess_seconds",
    "Decode + preprocess time per image (worker thread)",
    ["model"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    registry=metrics.REGISTRY,
)
POSTPROCESS_TIME = Histogram(
    "cnnserve_vision_postprocess_seconds",
    "Postprocess time per image (top-k, boxes, mask PNG)",
    ["model"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
    registry=metrics.REGISTRY,
)
IMAGES_PER_REQUEST = Histogram(
    "cnnserve_vision_images_per_request",
    "Images per vision API request",
    ["model", "rpc"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=metrics.REGISTRY,
)
IMAGE_ERRORS = Counter(
    "cnnserve_vision_image_errors",
    "Images refused by the vision API, by reason",
    ["model", "reason"],
    registry=metrics.REGISTRY,
)


@dataclass
class Labelled:
    """A class index with its label and a value (a score or a pixel fraction)."""

    class_index: int
    label: str
    value: float


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the original picture's pixels
    class_index: int
    label: str
    score: float


@dataclass
class ImageResult:
    """One picture's answer; only the fields of its call are filled in."""

    index: int
    width: int = 0
    height: int = 0
    error: ImageDecodeError | None = None
    classes: list[Labelled] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    mask_png: bytes = b""
    fractions: list[Labelled] = field(default_factory=list)
    latent: list[float] = field(default_factory=list)
    image_png: bytes = b""


@dataclass
class VisionAnswer:
    call: str  # "Classify", "Detect", ...
    model_name: str
    model_version: str
    results: list[ImageResult]
    labels: list[str] = field(default_factory=list)  # Segment: every class's label


@dataclass
class _Answered:
    """One decoded picture and the model's outputs for it."""

    prepared: PreparedImage
    outputs: dict[str, np.ndarray]


_Outcome = _Answered | ImageDecodeError  # a picture that could not be decoded is its error


Infer = Callable[[Any], Awaitable[dict[str, np.ndarray]]]  # the data plane's: normalized request -> outputs
Resolve = Callable[[str, str], ServedModel]


class VisionCalls:
    def __init__(
        self,
        resolve: Resolve,
        infer: Infer,
        threads: int = DEFAULT_VISION_THREADS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._resolve = resolve
        self._infer = infer
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="vision")
        self._max_pixels = max_pixels

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- the calls -----------------------------------------------------------------------------------------
    async def classify(
        self,
        name: str,
        version: str,
        images: list[bytes],
        *,
        top_k: int = 0,
        transport_remaining_s: float | None = None,
    ) -> VisionAnswer:
        _check_count("Classify", "top_k", top_k)
        k = top_k or DEFAULT_TOP_K

        async def fill(
            model: ServedModel, meta: ModelMeta, result: ImageResult, o: _Answered, answer: VisionAnswer
        ) -> None:
            idx, probs = await self._post(model, postprocess.top_k, _first(o.outputs)[0], k)
            result.classes = [
                Labelled(c, postprocess.label_of(meta.labels, c), p)
                for c, p in zip(idx.tolist(), probs.tolist(), strict=True)
            ]

        return await self._run("Classify", name, version, images, transport_remaining_s, fill)

    async def detect(
        self,
        name: str,
        version: str,
        images: list[bytes],
        *,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        max_detections: int = 0,
        transport_remaining_s: float | None = None,
    ) -> VisionAnswer:
        if not math.isfinite(score_threshold) or not 0.0 <= score_threshold <= 1.0:
            raise invalid(f"Detect: score_threshold must be in [0, 1], got {score_threshold}")
        _check_count("Detect", "max_detections", max_detections)

        async def fill(
            model: ServedModel, meta: ModelMeta, result: ImageResult, o: _Answered, answer: VisionAnswer
        ) -> None:
            out = o.outputs
            det = await self._post(
                model,
                postprocess.detections,
                _named(out, "num_detections")[0],
                _named(out, "boxes")[0],
                _named(out, "scores")[0],
                _named(out, "labels")[0],
                o.prepared.geometry,
                score_threshold,
                max_detections,
            )
            result.detections = [
                Detection(tuple(box), cls, postprocess.label_of(meta.labels, cls), score)
                for box, score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(), strict=True)
            ]

        return await self._run("Detect", name, version, images, transport_remaining_s, fill)

    async def segment(
        self, name: str, version: str, images: list[bytes], *, transport_remaining_s: float | None = None
    ) -> VisionAnswer:
        async def fill(
            model: ServedModel, meta: ModelMeta, result: ImageResult, o: _Answered, answer: VisionAnswer
        ) -> None:
            logits = _first(o.outputs)[0]
            num_classes = logits.shape[0]
            result.mask_png, fractions = await self._post(
                model, _segment_one, logits, o.prepared.geometry, offload=True
            )
            result.fractions = [
                Labelled(c, postprocess.label_of(meta.labels, c), f) for c, f in enumerate(fractions.tolist())
            ]
            answer.labels = [postprocess.label_of(meta.labels, c) for c in range(num_classes)]

        return await self._run("Segment", name, version, images, transport_remaining_s, fill)

    async def encode(
        self, name: str, version: str, images: list[bytes], *, transport_remaining_s: float | None = None
    ) -> VisionAnswer:
        async def fill(
            model: ServedModel, meta: ModelMeta, result: ImageResult, o: _Answered, answer: VisionAnswer
        ) -> None:
            result.latent = _named(o.outputs, "latent")[0].reshape(-1).tolist()

        return await self._run("Encode", name, version, images, transport_remaining_s, fill)

    async def reconstruct(
        self, name: str, version: str, images: list[bytes], *, transport_remaining_s: float | None = None
    ) -> VisionAnswer:
        async def fill(
            model: ServedModel, meta: ModelMeta, result: ImageResult, o: _Answered, answer: VisionAnswer
        ) -> None:
            result.latent = _named(o.outputs, "latent")[0].reshape(-1).tolist()
            recon = _named(o.outputs, "reconstruction")[0]
            result.image_png = await self._post(model, _reconstruct_one, recon, meta, offload=True)

        return await self._run("Reconstruct", name, version, images, transport_remaining_s, fill)

    # -- shared pipeline -------------------------------------------------------------------------------------
    def _model_for(self, call: str, name: str, version: str) -> tuple[ServedModel, ModelMeta]:
        model = self._resolve(name, version)
        meta = model.meta
        if meta is None:
            raise failed_precondition(
                f"model '{name}' has no model.json (task and preprocessing), so {call} cannot "
                "feed it pictures; use ModelInfer with tensors"
            )
        if meta.task not in CALL_TASKS[call]:
            wanted = " or ".join(t.value for t in CALL_TASKS[call])
            raise failed_precondition(f"model '{name}' is a {meta.task.value} model; {call} needs a {wanted} model")
        if not any(spec.name == meta.input_name for spec in model.inputs):
            raise failed_precondition(
                f"model '{name}': model.json names input '{meta.input_name}', the model has "
                f"{', '.join(spec.name for spec in model.inputs)}"
            )
        return model, meta

    def _prepare(self, model: ServedModel, data: bytes, meta: ModelMeta, index: int, pixels: bool) -> PreparedImage:
        start = time.perf_counter()
        prepared = prepare_image(data, meta.preprocess, index=index, max_pixels=self._max_pixels, pixels=pixels)
        PREPROCESS_TIME.labels(model.name).observe(time.perf_counter() - start)
        return prepared

    async def _one(
        self, model: ServedModel, meta: ModelMeta, data: bytes, index: int, deadline: float | None, received_ns: int
    ) -> _Outcome:
        loop = asyncio.get_running_loop()
        dtype = next(spec.dtype for spec in model.inputs if spec.name == meta.input_name)
        # A model exported with --input-dtype uint8 normalizes in its graph: it takes the pixels as they are.
        pixels = dtype == np.uint8
        try:
            prepared = await loop.run_in_executor(self._pool, self._prepare, model, data, meta, index, pixels)
        except ImageDecodeError as exc:
            IMAGE_ERRORS.labels(model.name, exc.reason.value).inc()
            return exc
        tensor = prepared.tensor[None]
        if tensor.dtype != dtype:  # an FP16 export takes the same pixels in half precision
            tensor = tensor.astype(dtype)
        request = normalize_arrays(model, {meta.input_name: tensor}, deadline=deadline, received_ns=received_ns)
        return _Answered(prepared, await self._infer(request))

    async def _run(
        self,
        call: str,
        name: str,
        version: str,
        images: list[bytes],
        transport_remaining_s: float | None,
        fill: Callable[[ServedModel, ModelMeta, ImageResult, _Answered, VisionAnswer], Awaitable[None]],
    ) -> VisionAnswer:
        received_ns = time.perf_counter_ns()
        if not name:
            raise invalid(f"{call}: model_name is empty")
        model, meta = self._model_for(call, name, version)
        if not images:
            raise invalid(f"{call}: the request has no images")
        IMAGES_PER_REQUEST.labels(model.name, call).observe(len(images))
        deadline = deadline_from(transport_remaining_s, None, model.default_timeout_us)
        # gather cancels the siblings when one fails, so a refused request leaves nothing queued.
        outcomes = await _gather_or_cancel(
            [self._one(model, meta, data, i, deadline, received_ns) for i, data in enumerate(images)]
        )
        errors = [o for o in outcomes if isinstance(o, ImageDecodeError)]
        if len(errors) == len(outcomes):
            raise invalid("no image could be decoded: " + "; ".join(str(e) for e in errors))
        answer = VisionAnswer(call, model.name, str(model.version), [])
        for i, o in enumerate(outcomes):
            if isinstance(o, ImageDecodeError):
                answer.results.append(ImageResult(i, error=o))
                continue
            geo = o.prepared.geometry
            result = ImageResult(i, width=geo.orig_width, height=geo.orig_height)
            answer.results.append(result)
            await fill(model, meta, result, o, answer)
        return answer

    async def _post(self, model: ServedModel, fn: Callable[..., Any], *args: Any, offload: bool = False) -> Any:
        """Run one picture's postprocessing, timed; heavy ones (mask resize, PNG) in the worker pool."""
        start = time.perf_counter()
        if offload:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        else:
            result = fn(*args)
        POSTPROCESS_TIME.labels(model.name).observe(time.perf_counter() - start)
        return result


# -- helpers -------------------------------------------------------------------------------------------------


def _check_count(call: str, key: str, value: int) -> None:
    if not 0 <= value < UINT32_LIMIT:
        raise invalid(f"{call}: {key} must be in [0, 2^32), got {value}")


async def _gather_or_cancel(coros: list[Awaitable[_Outcome]]) -> list[_Outcome]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _first(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Classifiers and segmenters have one output; exporters name it differently, so take it by place."""
    return next(iter(outputs.values()))


def _named(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return outputs[name]
    except KeyError:
        raise internal(f"model output '{name}' missing; it has {', '.join(outputs)}") from None


def _segment_one(logits: np.ndarray, geometry: Geometry) -> tuple[bytes, np.ndarray]:
    mask = postprocess.segmentation_mask(logits, geometry)
    return postprocess.mask_png(mask), postprocess.class_fractions(mask, logits.shape[0])


def _reconstruct_one(reconstruction: np.ndarray, meta: ModelMeta) -> bytes:
    return postprocess.encode_png(postprocess.reconstruction_image(reconstruction, meta.preprocess))
