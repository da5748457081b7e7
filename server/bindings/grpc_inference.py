"""The gRPC binding of the Open Inference Protocol (inference.GRPCInferenceService) on grpc.aio.

Handlers only translate: the wire request into data-plane calls (server/dataplane/plane.py, where every
check lives), the result into the protocol's response (server/bindings/v2_messages.py). Failures are
raised, never answered here: the error boundary (server/bindings/grpc_boundary.py) maps them to a
status for every RPC alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from cnncore.datatypes import from_numpy
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server import logs, tracing
from server.bindings import v2_messages as v2
from server.bindings.grpc_boundary import guard_servicer
from server.bindings.grpc_wire import (
    WireError,
    WireInferRequest,
    encode_output,
    from_message,
    parameters_of,
    parse_infer_request,
    tensor_in,
)
from server.dataplane.normalize import OutputIn
from server.dataplane.plane import DataPlane, InferenceResponse
from server.dataplane.tensors import TensorIn
from server.errors import invalid, status_of
from server.model_overrides import check_repository_name, check_unload, load_override
from server.shared_memory import BYTE_SIZE, REGION

log = logging.getLogger("cnnserve.grpc")

# the servicer never reads or writes typed messages through the context (only time_remaining())
Context = grpc.aio.ServicerContext[Any, Any]


def tensors_in(request: WireInferRequest) -> list[TensorIn]:
    """The request's inputs with their raw_input_contents entries. As in Triton, raw entries belong, in
    order, to the inputs that name no shared-memory region (which sources an input may give, and
    whether a region exists, the data plane checks)."""
    header, raw = request.header, request.raw
    params = [parameters_of(t.parameters) if t.parameters else {} for t in header.inputs]
    wanting = [t for t, p in zip(header.inputs, params, strict=True) if REGION not in p]
    if raw and len(raw) != len(wanting):
        raise invalid(
            f"raw_input_contents has {len(raw)} entries for {len(wanting)} inputs not in shared "
            "memory; when raw contents are used every such input must have one"
        )
    raw_entries = iter(raw)
    return [
        tensor_in(t, next(raw_entries) if raw and REGION not in p else None, p)
        for t, p in zip(header.inputs, params, strict=True)
    ]


def outputs_in(request: WireInferRequest) -> list[OutputIn]:
    return [OutputIn(o.name, parameters_of(o.parameters) if o.parameters else {}) for o in request.header.outputs]


def build_response(response: InferenceResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version, id=response.id)
    for o in response.outputs:
        if o.region is None:
            encode_output(o.name, o.array, out)
            continue
        tensor = out.outputs.add(name=o.name, datatype=from_numpy(o.array.dtype), shape=o.array.shape)
        tensor.parameters[REGION].string_param = o.region
        tensor.parameters[BYTE_SIZE].int64_param = o.written
        # Written into the region; the response keeps an empty entry so raw_output_contents stays
        # index-aligned with outputs (what tritonclient reads), as Triton's does.
        out.raw_output_contents.append(b"")
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    # -- health and metadata -----------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return v2.server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        model = self.plane.model(request.name, request.version)
        return v2.model_metadata(model, self.plane.versions(model))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.plane.model(request.name, request.version).config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        return v2.model_statistics(self.plane.statistics(request.name, request.version))

    # -- repository ----------------------------------------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        check_repository_name(request.repository_name)
        return v2.repository_index(self.plane.repository_index(request.ready))

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        await self.plane.load(request.model_name, load_override(request))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        check_unload(request)
        await self.plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory (server/shared_memory.py) ------------------------------------------------
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.plane.register_region(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.plane.unregister_region(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        return v2.region_status(self.plane.region_status(request.name))

    # CUDA shared memory: the data plane's answers (no region can exist here), alike over REST.
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Context
    ) -> pb.CudaSharedMemoryRegisterResponse:
        self.plane.cuda_register_region(request.name)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.plane.cuda_unregister_region(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        self.plane.cuda_region_status(request.name)  # lists none
        return pb.CudaSharedMemoryStatusResponse()

    # -- logging and trace extensions (server/logs.py, server/tracing.py) ------------------------------
    async def LogSettings(self, request: pb.LogSettingsRequest, context: Context) -> pb.LogSettingsResponse:
        return logs.settings_rpc(request)

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Context) -> pb.TraceSettingResponse:
        return tracing.setting_rpc(request, self.plane.repository)

    # -- inference -----------------------------------------------------------------------------------
    async def _infer(self, request: WireInferRequest, context: Context, received_ns: int) -> pb.ModelInferResponse:
        header = request.header
        normalized = await self.plane.normalize(
            header.model_name,
            header.model_version,
            tensors_in(request),
            outputs=outputs_in(request),
            parameters=parameters_of(header.parameters),
            request_id=header.id,
            transport_remaining_s=context.time_remaining(),
            received_ns=received_ns,
        )
        return build_response(await self.plane.infer(normalized))

    async def ModelInfer(self, request: bytes, context: Context) -> pb.ModelInferResponse:
        # Registered with no request deserializer: `request` is the serialized message, decoded here
        # without copying tensor bytes (server/bindings/grpc_wire.py).
        received = time.perf_counter_ns()
        with self.plane.admitted(len(request)):
            try:
                parsed = parse_infer_request(request)
            except (WireError, DecodeError) as exc:
                raise invalid(f"malformed ModelInferRequest: {exc}") from None
            return await self._infer(parsed, context, received)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests of one stream run concurrently (so they can share batches); responses go back as each
        # finishes, matched by `id` as the protocol allows. Errors answer that request, not the stream:
        # its status message (from the same status_of every binding uses) goes in error_message.
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(req: pb.ModelInferRequest) -> None:
            # Admission's refusal is inside the try: it answers this request like any other failure
            # (raised outside, it would end this task unseen and the request would get no answer).
            try:
                with self.plane.admitted(req.ByteSize()):
                    resp = await self._infer(from_message(req), context, time.perf_counter_ns())
                    await out.put(pb.ModelStreamInferResponse(infer_response=resp))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = status_of(exc, "ModelStreamInfer")
                await out.put(
                    pb.ModelStreamInferResponse(
                        error_message=err.message,
                        infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id),
                    )
                )

        async def reader() -> None:
            # The end mark goes out however reading ends: after a message that does not parse the loop
            # below must stop and re-raise that error (INVALID_ARGUMENT), not wait on `out` forever.
            try:
                async for req in request_iterator:
                    t = asyncio.create_task(one(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                out.put_nowait(None)

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


GrpcBinding = Callable[[grpc.aio.Server, DataPlane], Awaitable[str] | str]


def add_inference_service(server: grpc.aio.Server, plane: DataPlane) -> str:
    """The gRPC binding's registration (server.app.GRPC_BINDINGS); returns the full service name."""
    servicer = InferenceServicer(plane)
    # ModelInfer takes the serialized request (no deserializer) so tensors are read without copies.
    model_infer: grpc.RpcMethodHandler[bytes, pb.ModelInferResponse] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer, request_deserializer=None, response_serializer=pb.ModelInferResponse.SerializeToString
    )
    return guard_servicer(
        server, pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, overrides={"ModelInfer": model_infer}
    )
