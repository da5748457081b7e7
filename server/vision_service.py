"""The vision API servicer (protos/vision.proto): pictures in, answers out, through the same batcher.

Per request: resolve the model (NOT_FOUND), check its task fits the RPC (FAILED_PRECONDITION), then
per image, concurrently: decode + preprocess in a worker thread with the model's stored spec, submit
the image as its own request to the model's dynamic batcher (so images from every client and from
ModelInfer share batches), and postprocess onto the original picture. An image that fails to decode
gets a per-image error; the others are answered. Failures of the model itself (queue full, deadline,
backend) are the request's status, raised to the same error boundary as ModelInfer's.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

import grpc
import numpy as np
from prometheus_client import Counter, Histogram

from cnncore import postprocess
from cnncore.imaging import DEFAULT_MAX_PIXELS, ImageDecodeError, PreparedImage, prepare_image
from cnncore.preprocess import Geometry
from cnncore.spec import ModelMeta, Task
from protos import vision_pb2 as vpb
from protos import vision_pb2_grpc as vpb_grpc
from server import metrics
from server.boundary import guard_servicer
from server.errors import failed_precondition, internal, invalid
from server.model import ServedModel
from server.repository import ModelRepository
from server.request import RequestPath, ServerState, deadline_from

log = logging.getLogger("cnnserve.vision")

DEFAULT_TOP_K = 5

# Which model tasks each RPC serves.
RPC_TASKS: dict[str, tuple[Task, ...]] = {
    "Classify": (Task.classification,),
    "Detect": (Task.detection,),
    "Segment": (Task.segmentation,),
    "Encode": (Task.encoder, Task.autoencoder),
    "Reconstruct": (Task.autoencoder,),
}

PREPROCESS_TIME = Histogram(
    "cnnserve_vision_preprocess_seconds", "Decode + preprocess time per image (worker thread)",
    ["model"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    registry=metrics.REGISTRY,
)
POSTPROCESS_TIME = Histogram(
    "cnnserve_vision_postprocess_seconds", "Postprocess time per image (top-k, boxes, mask PNG)",
    ["model"], buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
    registry=metrics.REGISTRY,
)
IMAGES_PER_REQUEST = Histogram(
    "cnnserve_vision_images_per_request", "Images per vision API request",
    ["model", "rpc"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=metrics.REGISTRY,
)
IMAGE_ERRORS = Counter(
    "cnnserve_vision_image_errors", "Images refused by the vision API, by reason",
    ["model", "reason"], registry=metrics.REGISTRY,
)


@dataclass
class _Outcome:
    """One image's answer: model outputs + geometry, or the decode error."""

    prepared: PreparedImage | None = None
    outputs: dict[str, np.ndarray] | None = None
    error: ImageDecodeError | None = None


class VisionService(vpb_grpc.VisionServiceServicer):
    def __init__(self, path: RequestPath, workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self._path = path
        # Decoding and resizing release the GIL in Pillow's C code: a small pool keeps the event loop
        # free to accept and answer while pictures are decoded. Sized to the cores, like the batcher.
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="vision")
        self._max_pixels = max_pixels

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- shared pipeline -------------------------------------------------------------------------------------
    def _model_for(self, rpc: str, name: str, version: str) -> tuple[ServedModel, ModelMeta]:
        model = self._path.resolve(name, version)
        meta = model.meta
        if meta is None:
            raise failed_precondition(
                             f"model '{name}' has no model.json (task and preprocessing), so {rpc} cannot "
                             "feed it pictures; use ModelInfer with tensors")
        if meta.task not in RPC_TASKS[rpc]:
            wanted = " or ".join(t.value for t in RPC_TASKS[rpc])
            raise failed_precondition(
                             f"model '{name}' is a {meta.task.value} model; {rpc} needs a {wanted} model")
        if not any(spec.name == meta.input_name for spec in model.inputs):
            raise failed_precondition(
                             f"model '{name}': model.json names input '{meta.input_name}', the model has "
                             f"{', '.join(spec.name for spec in model.inputs)}")
        return model, meta

    def _prepare(self, model: ServedModel, data: bytes, meta: ModelMeta, index: int, pixels: bool) -> PreparedImage:
        start = time.perf_counter()
        prepared = prepare_image(data, meta.preprocess, index=index, max_pixels=self._max_pixels, pixels=pixels)
        PREPROCESS_TIME.labels(model.name).observe(time.perf_counter() - start)
        return prepared

    async def _one(self, model: ServedModel, meta: ModelMeta, data: bytes, index: int,
                   deadline: float | None, received_ns: int) -> _Outcome:
        loop = asyncio.get_running_loop()
        dtype = next(spec.dtype for spec in model.inputs if spec.name == meta.input_name)
        # A model exported with --input-dtype uint8 normalizes in its graph: it takes the pixels as they are.
        pixels = dtype == np.uint8
        try:
            prepared = await loop.run_in_executor(self._pool, self._prepare, model, data, meta, index, pixels)
        except ImageDecodeError as exc:
            IMAGE_ERRORS.labels(model.name, exc.reason.value).inc()
            return _Outcome(error=exc)
        tensor = prepared.tensor[None]
        if tensor.dtype != dtype:  # an FP16 export takes the same pixels in half precision
            tensor = tensor.astype(dtype)
        outputs = await self._path.infer_arrays(model, {meta.input_name: tensor}, deadline, received_ns)
        return _Outcome(prepared=prepared, outputs=outputs)

    async def _run(self, rpc: str, request: Any, context: grpc.aio.ServicerContext,
                   answer: Callable[[ServedModel, ModelMeta, list[_Outcome], Any], Awaitable[Any]]) -> Any:
        received_ns = time.perf_counter_ns()
        with self._path.state.accepted(request.ByteSize()):  # shutdown waits for these, as for ModelInfer
            if not request.model_name:
                raise invalid(f"{rpc}: model_name is empty")
            model, meta = self._model_for(rpc, request.model_name, request.model_version)
            if not request.images:
                raise invalid(f"{rpc}: the request has no images")
            IMAGES_PER_REQUEST.labels(model.name, rpc).observe(len(request.images))
            deadline = deadline_from(context.time_remaining(), None)
            # gather cancels the siblings when one fails, so a refused request leaves nothing queued.
            outcomes = await _gather_or_cancel(
                [self._one(model, meta, data, i, deadline, received_ns) for i, data in enumerate(request.images)]
            )
            errors = [o.error for o in outcomes if o.error is not None]
            if len(errors) == len(outcomes):
                raise invalid("no image could be decoded: " + "; ".join(str(e) for e in errors))
            return await answer(model, meta, outcomes, request)

    async def _post(self, model: ServedModel, fn: Callable[..., Any], *args: Any, offload: bool = False) -> Any:
        """Run one image's postprocessing, timed; heavy ones (mask resize, PNG) in the worker pool."""
        start = time.perf_counter()
        if offload:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        else:
            result = fn(*args)
        POSTPROCESS_TIME.labels(model.name).observe(time.perf_counter() - start)
        return result

    # -- RPCs ------------------------------------------------------------------------------------------------
    async def Classify(self, request: vpb.ClassifyRequest, context: grpc.aio.ServicerContext) -> vpb.ClassifyResponse:
        async def answer(model: ServedModel, meta: ModelMeta, outcomes: list[_Outcome], req: Any) -> Any:
            k = req.top_k or DEFAULT_TOP_K
            response = vpb.ClassifyResponse(model_name=model.name, model_version=str(model.version))
            for result, o in _answered(response, outcomes):
                idx, probs = await self._post(model, postprocess.top_k, _first(o.outputs)[0], k)
                for c, p in zip(idx.tolist(), probs.tolist()):
                    result.classes.add(class_index=c, label=postprocess.label_of(meta.labels, c), score=p)
            return response

        return await self._run("Classify", request, context, answer)

    async def Detect(self, request: vpb.DetectRequest, context: grpc.aio.ServicerContext) -> vpb.DetectResponse:
        threshold = request.score_threshold
        if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise invalid(f"Detect: score_threshold must be in [0, 1], got {threshold}")

        async def answer(model: ServedModel, meta: ModelMeta, outcomes: list[_Outcome], req: Any) -> Any:
            response = vpb.DetectResponse(model_name=model.name, model_version=str(model.version))
            for result, o in _answered(response, outcomes):
                out = o.outputs
                det = await self._post(
                    model, postprocess.detections, _named(out, "num_detections")[0], _named(out, "boxes")[0],
                    _named(out, "scores")[0], _named(out, "labels")[0], o.prepared.geometry,
                    req.score_threshold, req.max_detections,
                )
                for box, score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist()):
                    result.detections.add(box=vpb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]),
                                          class_index=cls, label=postprocess.label_of(meta.labels, cls), score=score)
            return response

        return await self._run("Detect", request, context, answer)

    async def Segment(self, request: vpb.SegmentRequest, context: grpc.aio.ServicerContext) -> vpb.SegmentResponse:
        async def answer(model: ServedModel, meta: ModelMeta, outcomes: list[_Outcome], req: Any) -> Any:
            response = vpb.SegmentResponse(model_name=model.name, model_version=str(model.version))
            num_classes = None
            for result, o in _answered(response, outcomes):
                logits = _first(o.outputs)[0]
                num_classes = logits.shape[0]
                png, fractions = await self._post(model, _segment_one, logits, o.prepared.geometry, offload=True)
                result.mask_png = png
                for c, f in enumerate(fractions.tolist()):
                    result.fractions.add(class_index=c, label=postprocess.label_of(meta.labels, c), fraction=f)
            if num_classes is not None:
                response.labels.extend(postprocess.label_of(meta.labels, c) for c in range(num_classes))
            return response

        return await self._run("Segment", request, context, answer)

    async def Encode(self, request: vpb.EncodeRequest, context: grpc.aio.ServicerContext) -> vpb.EncodeResponse:
        async def answer(model: ServedModel, meta: ModelMeta, outcomes: list[_Outcome], req: Any) -> Any:
            response = vpb.EncodeResponse(model_name=model.name, model_version=str(model.version))
            for result, o in _answered(response, outcomes):
                result.latent.extend(_named(o.outputs, "latent")[0].reshape(-1).tolist())
            return response

        return await self._run("Encode", request, context, answer)

    async def Reconstruct(self, request: vpb.ReconstructRequest,
                          context: grpc.aio.ServicerContext) -> vpb.ReconstructResponse:
        async def answer(model: ServedModel, meta: ModelMeta, outcomes: list[_Outcome], req: Any) -> Any:
            response = vpb.ReconstructResponse(model_name=model.name, model_version=str(model.version))
            for result, o in _answered(response, outcomes):
                result.latent.extend(_named(o.outputs, "latent")[0].reshape(-1).tolist())
                recon = _named(o.outputs, "reconstruction")[0]
                result.image_png = await self._post(model, _reconstruct_one, recon, meta, offload=True)
            return response

        return await self._run("Reconstruct", request, context, answer)


def add_vision_service(server: grpc.aio.Server, repository: ModelRepository, state: ServerState) -> str:
    """The server's servicer hook (server.app.SERVICER_ADDERS): the same request path and batchers as
    the inference protocol, behind the same error boundary."""
    return guard_servicer(server, vpb_grpc.add_VisionServiceServicer_to_server,
                          VisionService(RequestPath(repository, state)))


# -- helpers -------------------------------------------------------------------------------------------------


async def _gather_or_cancel(coros: list[Awaitable[_Outcome]]) -> list[_Outcome]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _answered(response: Any, outcomes: list[_Outcome]) -> Iterator[tuple[Any, _Outcome]]:
    """Add one result per image to `response` (a failed image's carries its error) and yield
    (result, outcome) for the images the model answered, to be filled in."""
    for i, outcome in enumerate(outcomes):
        result = response.results.add(image=_info(i, outcome))
        if outcome.outputs is not None:
            yield result, outcome


def _info(index: int, outcome: _Outcome) -> vpb.ImageInfo:
    if outcome.error is not None:
        reason = vpb.ImageError.Reason.Value(outcome.error.reason.value)
        return vpb.ImageInfo(index=index, error=vpb.ImageError(reason=reason, message=str(outcome.error)))
    geo = outcome.prepared.geometry
    return vpb.ImageInfo(index=index, width=geo.orig_width, height=geo.orig_height)


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
