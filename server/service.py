"""The Open Inference Protocol binding (inference.GRPCInferenceService) on grpc.aio.

Handlers only translate: the wire request into the request path's terms (server/request.py, where
every check lives), its result into the protocol's response. Failures are raised, never answered
here: the error boundary (server/boundary.py) maps them to a status for every RPC alike.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from cnncore.datatypes import from_numpy
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.boundary import guard_servicer, status_of
from server.classification import class_counts, classify
from server.errors import InferError, echo, invalid, not_found, unavailable
from server.infer_request import InferRequest, WireError, from_message, parse_infer_request
from server.model_overrides import check_repository_name, check_unload, load_override
from server.protocol_checks import check_infer_parameters
from server.repository import ModelRepository
from server.request import InferenceRequest, RequestPath, ServerState
from server.shared_memory import (BYTE_SIZE, REGION, OutputTarget, SharedMemoryRegistry, output_target,
                                  tensor_source)
from server.tensors import TensorIn, encode_output, tensor_in

log = logging.getLogger("cnnserve.service")

SERVER_NAME = "cnnserve"
SERVER_VERSION = "0.1.0"
# The protocol extensions this server implements (what ServerMetadata advertises to clients).
EXTENSIONS = ["classification", "model_configuration", "model_repository", "model_repository(unload_dependents)",
              "statistics", "system_shared_memory", "binary_tensor_data"]  # not "parameters": custom ones are refused


def parameters_of(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """Protocol parameters as Python values (what the request path reads), whichever oneof is set."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def tensors_in(request: InferRequest, shm: SharedMemoryRegistry) -> list[TensorIn]:
    """The request's inputs, each with its shared-memory window, its raw_input_contents entry or its
    typed contents. As in Triton, raw entries belong, in order, to the inputs that name no region."""
    header, raw = request.header, request.raw
    sources = [tensor_source(shm, t.name, parameters_of(t.parameters)) if t.parameters else None
               for t in header.inputs]
    wanting = [t for t, src in zip(header.inputs, sources) if src is None]
    if raw and len(raw) != len(wanting):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(wanting)} inputs not in shared "
                      "memory; when raw contents are used every such input must have one")
    tensors = []
    raw_entries = iter(raw)
    for t, src in zip(header.inputs, sources):
        if src is not None:
            if t.HasField("contents"):
                raise invalid(f"input '{t.name}': both contents and a shared memory region given")
            tensors.append(tensor_in(t, src))
            continue
        if raw and t.HasField("contents"):
            raise invalid(f"input '{t.name}': both contents and raw_input_contents given")
        tensors.append(tensor_in(t, next(raw_entries) if raw else None))
    return tensors


def output_targets(request: InferRequest, shm: SharedMemoryRegistry) -> dict[str, OutputTarget]:
    """Requested outputs to be written into shared memory, by name (windows checked before inference)."""
    targets = {}
    for o in request.header.outputs:
        if o.parameters and (target := output_target(shm, o.name, parameters_of(o.parameters))) is not None:
            targets[o.name] = target
    return targets


def build_response(request: InferenceRequest, outputs: dict[str, np.ndarray],
                   targets: Mapping[str, OutputTarget] | None = None) -> pb.ModelInferResponse:
    model = request.model
    response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
    for name in request.outputs:
        target = targets.get(name) if targets else None
        if target is None:
            encode_output(name, outputs[name], response)
            continue
        arr = outputs[name]
        out = response.outputs.add(name=name, datatype=from_numpy(arr.dtype), shape=arr.shape)
        written = target.write(arr)
        out.parameters[REGION].string_param = target.region.name
        out.parameters[BYTE_SIZE].int64_param = written
        # Written into the region; the response keeps an empty entry so raw_output_contents stays
        # index-aligned with outputs (what tritonclient reads), as Triton's does.
        response.raw_output_contents.append(b"")
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, state: ServerState) -> None:
        self.repository = repository
        self.state = state
        self.path = RequestPath(repository, state)

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
        model = self.repository.get(request.name, request.version)
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
        model = self.repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(self, request, context):
        if request.name:
            models = [self.repository.get(request.name, request.version)]
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
        check_repository_name(request.repository_name)
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

    def _check_model_control(self) -> None:
        # Triton's answer (status and wording) in modes that do not take load/unload requests.
        if self.state.model_control_mode != "explicit":
            raise unavailable("explicit model load / unload is not allowed in model-control-mode "
                              f"{self.state.model_control_mode}; start the server with "
                              "--model-control-mode explicit to load and unload models on request")

    async def RepositoryModelLoad(self, request, context):
        self._check_model_control()
        if self.state.shutting_down:
            raise unavailable("server is shutting down")
        state = await self.repository.load(request.model_name, load_override(request))
        if not state.versions:
            raise invalid(f"failed to load {echo(request.model_name)}: {state.reason}")
        if state.reason:  # a reload failed; the previously loaded copy keeps serving
            raise invalid(f"failed to reload {echo(request.model_name)} (previous copy still serving): {state.reason}")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        self._check_model_control()
        check_unload(request)
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory (server/shared_memory.py) ------------------------------------------------
    async def SystemSharedMemoryRegister(self, request, context):
        self.state.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        self.state.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        out = pb.SystemSharedMemoryStatusResponse()
        for r in self.state.shared_memory.status(request.name):
            out.regions[r.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return out

    # CUDA shared memory: no region can exist here, so status lists none and unregister (a client's
    # cleanup, e.g. perf_analyzer's on exit) succeeds, as Triton answers when none is registered.
    async def CudaSharedMemoryRegister(self, request, context):
        raise InferError(grpc.StatusCode.UNIMPLEMENTED, "CUDA shared memory is not supported by this server; "
                                                        "use system shared memory")

    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            raise not_found(f"CUDA shared memory region {echo(request.name)} is not registered")
        return pb.CudaSharedMemoryStatusResponse()

    # -- inference -----------------------------------------------------------------------------------
    async def _infer(self, request: InferRequest, context: grpc.aio.ServicerContext,
                     received_ns: int) -> pb.ModelInferResponse:
        header = request.header
        check_infer_parameters("grpc", parameters_of(header.parameters),
                               ((t.name, parameters_of(t.parameters)) for t in header.inputs),
                               ((o.name, parameters_of(o.parameters)) for o in header.outputs))
        shm = self.state.shared_memory
        targets = output_targets(request, shm)
        counts = class_counts((o.name, parameters_of(o.parameters)) for o in header.outputs)
        normalized = await self.path.normalize(
            header.model_name, header.model_version, tensors_in(request, shm),
            outputs=[o.name for o in header.outputs], parameters=parameters_of(header.parameters),
            request_id=header.id, transport_remaining_s=context.time_remaining(), received_ns=received_ns)
        outputs = classify(normalized.model, await self.path.infer(normalized), counts)
        return build_response(normalized, outputs, targets)

    async def ModelInfer(self, request: bytes, context):
        # Registered with no request deserializer: `request` is the serialized message, decoded here
        # without copying tensor bytes (server/infer_request.py).
        received = time.perf_counter_ns()
        with self.state.accepted(len(request)):
            try:
                parsed = parse_infer_request(request)
            except (WireError, DecodeError) as exc:
                raise invalid(f"malformed ModelInferRequest: {exc}") from None
            return await self._infer(parsed, context, received)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests of one stream run concurrently (so they can share batches); responses go back as each
        # finishes, matched by `id` as the protocol allows. Errors answer that request, not the stream.
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(req: pb.ModelInferRequest) -> None:
            # Admission's refusal is inside the try: it answers this request like any other failure
            # (raised outside, it would end this task unseen and the request would get no answer).
            try:
                with self.state.accepted(req.ByteSize()):
                    resp = await self._infer(from_message(req), context, time.perf_counter_ns())
                    await out.put(pb.ModelStreamInferResponse(infer_response=resp))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - answers this request; the stream goes on
                err = status_of(exc, "ModelStreamInfer")
                await out.put(pb.ModelStreamInferResponse(
                    error_message=err.message,
                    infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id)))

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


ServicerAdder = Callable[[grpc.aio.Server, ModelRepository, ServerState], Awaitable[str] | str]


def add_inference_service(server: grpc.aio.Server, repository: ModelRepository, state: ServerState) -> str:
    servicer = InferenceServicer(repository, state)
    # ModelInfer takes the serialized request (no deserializer) so tensors are read without copies.
    model_infer = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer, request_deserializer=None,
        response_serializer=pb.ModelInferResponse.SerializeToString)
    return guard_servicer(server, pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer,
                          overrides={"ModelInfer": model_infer})
