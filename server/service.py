"""The Open Inference Protocol servicer (inference.GRPCInferenceService) on grpc.aio.

Handlers stay thin: decode the protocol tensors, ask the repository for the model, await
`ServedModel.infer`, encode raw outputs. Every failure below is an InferError carrying its status code;
anything unexpected becomes INTERNAL for that one request and is logged, never a crashed server.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.errors import InferError, invalid, unavailable
from server.infer_request import InferRequest, WireError, from_message, parse_infer_request
from server.model import ServedModel
from server.repository import ModelRepository
from server.tensors import decode_input, encode_output

log = logging.getLogger("cnnserve.service")

SERVER_NAME = "cnnserve"
SERVER_VERSION = "0.1.0"
# The protocol extensions this server implements (what ServerMetadata advertises to clients).
EXTENSIONS = ["model_configuration", "model_repository", "statistics", "parameters"]


class ServerState:
    """What every servicer must know about the process: readiness and whether it is draining."""

    def __init__(self) -> None:
        self.started = False
        self.shutting_down = False
        self.strict_readiness = False
        self.inflight = 0  # inference RPCs accepted and not yet answered

    def ready(self, repository: ModelRepository) -> bool:
        if not self.started or self.shutting_down:
            return False
        if self.strict_readiness:
            return all(s.state == "READY" for s in repository.models.values())
        return True


def _deadline(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> float | None:
    """The earlier of the gRPC deadline and the request parameter `timeout` (microseconds), on the loop clock."""
    loop = asyncio.get_running_loop()
    deadline = None
    remaining = context.time_remaining()
    if remaining is not None and remaining < 1e9:
        deadline = loop.time() + remaining
    if "timeout" in request.parameters:
        p = request.parameters["timeout"]
        which = p.WhichOneof("parameter_choice")
        if which not in ("int64_param", "uint64_param"):
            raise invalid(f"parameter 'timeout' must be an integer (microseconds), got {which}")
        us = getattr(p, which)
        if us > 0:
            t = loop.time() + us / 1e6
            deadline = t if deadline is None else min(deadline, t)
    return deadline


def decode_request(request: InferRequest) -> dict[str, np.ndarray]:
    header, raw = request.header, request.raw
    if raw and len(raw) != len(header.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(header.inputs)} inputs; "
                      "when raw contents are used every input must have one")
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(header.inputs):
        if t.name in inputs:
            raise invalid(f"input '{t.name}' given twice")
        if raw and t.HasField("contents"):
            raise invalid(f"input '{t.name}': both contents and raw_input_contents given")
        inputs[t.name] = decode_input(t, raw[i] if raw else None)
    return inputs


def build_response(model: ServedModel, request: pb.ModelInferRequest,
                   outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
    names = [o.name for o in request.outputs] or model.output_names
    for name in names:
        encode_output(name, outputs[name], response)
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, state: ServerState) -> None:
        self.repository = repository
        self.state = state

    # -- health and metadata -----------------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready(self.repository))

    async def ModelReady(self, request, context):
        try:
            self.repository.get(request.name, request.version)
        except InferError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.state.shutting_down)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        model = await self._get(request.name, request.version, context)
        state = self.repository.models[model.name]
        batched = model.max_batch_size > 0
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(state.versions)],
            platform=model.platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype,
                                                            shape=s.metadata_shape(batched)) for s in model.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype,
                                                             shape=s.metadata_shape(batched)) for s in model.outputs],
        )

    async def ModelConfig(self, request, context):
        model = await self._get(request.name, request.version, context)
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(self, request, context):
        if request.name:
            models = [await self._get(request.name, request.version, context)]
        else:
            models = list(self.repository.served())
        out = pb.ModelStatisticsResponse()
        for m in models:
            s = m.stats
            ms = out.model_stats.add(name=m.name, version=str(m.version), last_inference=s.last_inference_ms,
                                     inference_count=s.inference_count, execution_count=s.execution_count)
            st = ms.inference_stats
            for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                d = getattr(s, field)
                getattr(st, field).count, getattr(st, field).ns = d.count, d.ns
            for size in sorted(s.batch):
                b = s.batch[size]
                bs = ms.batch_stats.add(batch_size=size)
                for field in ("compute_input", "compute_infer", "compute_output"):
                    d = getattr(b, field)
                    getattr(bs, field).count, getattr(bs, field).ns = d.count, d.ns
        return out

    # -- repository ----------------------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        out = pb.RepositoryIndexResponse()
        names = set(self.repository.models) | set(self.repository.names_on_disk())
        for name in sorted(names):
            st = self.repository.models.get(name)
            if st is None:
                if not request.ready:
                    out.models.add(name=name, state="UNAVAILABLE", reason="not loaded")
                continue
            if request.ready and st.state != "READY":
                continue
            if st.versions:
                for v in sorted(st.versions):
                    out.models.add(name=name, version=str(v), state=st.state, reason=st.reason)
            else:
                out.models.add(name=name, state=st.state, reason=st.reason)
        return out

    async def RepositoryModelLoad(self, request, context):
        if self.state.shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        state = await self.repository.load(request.model_name)
        if not state.versions:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"failed to load '{request.model_name}': {state.reason}")
        if state.reason:  # a reload failed; the previously loaded copy keeps serving
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"failed to reload '{request.model_name}' (previous copy still serving): "
                                f"{state.reason}")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            await self.repository.unload(request.model_name)
        except InferError as exc:
            await context.abort(exc.code, exc.message)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -----------------------------------------------------------------------------------
    async def _get(self, name: str, version: str, context) -> ServedModel:
        try:
            return self.repository.get(name, version)
        except InferError as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises

    async def _infer(self, request: InferRequest, context) -> pb.ModelInferResponse:
        received = time.perf_counter_ns()
        if self.state.shutting_down:
            raise unavailable("server is shutting down; not accepting new requests")
        header = request.header
        model = self.repository.get(header.model_name, header.model_version)
        for o in header.outputs:
            if o.name not in model.output_names:
                raise invalid(f"model '{model.name}': requested output '{o.name}' does not exist; "
                              f"outputs are {model.output_names}")
        inputs = decode_request(request)
        outputs = await model.infer(inputs, deadline=_deadline(header, context), received_ns=received)
        return build_response(model, header, outputs)

    async def ModelInfer(self, request: bytes, context):
        # Registered with no request deserializer: `request` is the serialized message, decoded here
        # without copying tensor bytes (server/infer_request.py).
        self.state.inflight += 1
        try:
            try:
                parsed = parse_infer_request(request)
            except (WireError, DecodeError) as exc:
                raise invalid(f"malformed ModelInferRequest: {exc}") from None
            return await self._infer(parsed, context)
        except InferError as exc:
            await context.abort(exc.code, exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("inference failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        finally:
            self.state.inflight -= 1

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests of one stream run concurrently (so they can share batches); responses go back as each
        # finishes, matched by `id` as the protocol allows. Errors answer that request, not the stream.
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(req: pb.ModelInferRequest) -> None:
            self.state.inflight += 1
            try:
                resp = await self._infer(from_message(req), context)
                await out.put(pb.ModelStreamInferResponse(infer_response=resp))
            except InferError as exc:
                await out.put(pb.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id)))
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the stream
                log.exception("stream inference failed", extra={"model": req.model_name})
                await out.put(pb.ModelStreamInferResponse(error_message=f"internal error: {exc}"))
            finally:
                self.state.inflight -= 1

        async def reader() -> None:
            async for req in request_iterator:
                t = asyncio.create_task(one(req))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await out.put(None)

        reader_task = asyncio.create_task(reader())
        try:
            while (item := await out.get()) is not None:
                yield item
            await reader_task
        finally:
            if not reader_task.done():
                reader_task.cancel()
            for t in list(tasks):
                t.cancel()


ServicerAdder = Callable[[grpc.aio.Server, ModelRepository, ServerState], Awaitable[str] | str]


class _HandlerCapture:
    """Stands in for the server to collect the generated method handlers, so one can be swapped."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def add_inference_service(server: grpc.aio.Server, repository: ModelRepository, state: ServerState) -> str:
    servicer = InferenceServicer(repository, state)
    capture = _HandlerCapture()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers = capture.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer, request_deserializer=None,
        response_serializer=pb.ModelInferResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    return SERVICE_NAME
