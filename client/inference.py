"""A client for the Open Inference Protocol (KServe v2) on the project's own generated stubs.

One method per RPC, named like tritonclient's, in a blocking (`InferenceClient`) and an asyncio
(`AsyncInferenceClient`) flavour that share request building and response parsing. The project keeps
its own client instead of wrapping tritonclient: tritonclient ships its own generated `inference.*`
messages, and importing them next to `protos.grpc_service_pb2` in one process fails with duplicate
symbols, so a program using our vision stubs could not use tritonclient for the tensor half.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import DEFAULT_URL, AsyncClient, BlockingClient, ClientTLS, InferenceServerError
from cnncore.datatypes import from_numpy, to_numpy
from cnncore.wire import deserialize_bytes, serialize_bytes
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

# ---- request building and response parsing, shared by both flavours ---------------------------------


def _parameter(value: Any) -> pb.InferParameter:
    p = pb.InferParameter()
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)
    return p


def build_infer_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    model_version: str = "",
    request_id: str = "",
    parameters: Mapping[str, Any] | None = None,
) -> pb.ModelInferRequest:
    """numpy inputs -> ModelInferRequest with raw contents (the fast path on both sides)."""
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(_parameter(value))
    for name, array in inputs.items():
        arr = np.asarray(array)
        datatype = from_numpy(arr.dtype)
        # raw_input_contents[i] belongs to inputs[i]: append both in the same order.
        request.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        if datatype == "BYTES":
            request.raw_input_contents.append(serialize_bytes(arr))
        else:
            request.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def parse_infer_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """ModelInferResponse -> {output name: numpy array}, from raw or typed contents."""
    result: dict[str, np.ndarray] = {}
    raw = response.raw_output_contents
    for i, out in enumerate(response.outputs):
        shape = tuple(int(d) for d in out.shape)
        count = int(np.prod(shape)) if shape else 1
        if i < len(raw):
            if out.datatype == "BYTES":
                result[out.name] = deserialize_bytes(raw[i], count, out.name).reshape(shape)
            else:
                result[out.name] = np.frombuffer(raw[i], dtype=to_numpy(out.datatype)).reshape(shape)
        else:  # typed contents: standard servers may answer this way
            fields = out.contents.ListFields()
            values = list(fields[0][1]) if fields else []
            result[out.name] = np.asarray(values, dtype=to_numpy(out.datatype)).reshape(shape)
    return result


def _stream_result(reply: pb.ModelStreamInferResponse) -> tuple[str, dict[str, np.ndarray]]:
    if reply.error_message:
        # The stream carries no status code per response; the message says what went wrong.
        raise InferenceServerError(
            grpc.StatusCode.UNKNOWN, f"request '{reply.infer_response.id}': {reply.error_message}"
        )
    return reply.infer_response.id, parse_infer_response(reply.infer_response)


def _health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# ---- blocking -----------------------------------------------------------------------------------------


class InferenceClient(BlockingClient):
    """Blocking client. `with InferenceClient("127.0.0.1:8001") as c: c.infer("m", {"input": x})`."""

    stub_type = pb_grpc.GRPCInferenceServiceStub

    def __init__(
        self,
        url: str = DEFAULT_URL,
        channel: grpc.Channel | None = None,
        *,
        tls: ClientTLS | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(url, channel, tls=tls, headers=headers)
        self._health: Any = health_pb2_grpc.HealthStub(self.channel)  # its stubs leave out Check

    def is_server_live(self, timeout: float | None = None) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest(), timeout).live

    def is_server_ready(self, timeout: float | None = None) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest(), timeout).ready

    def is_model_ready(self, model_name: str, model_version: str = "", timeout: float | None = None) -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=model_name, version=model_version), timeout).ready

    def get_server_metadata(self, timeout: float | None = None) -> pb.ServerMetadataResponse:
        return self._call("ServerMetadata", pb.ServerMetadataRequest(), timeout)

    def get_model_metadata(
        self, model_name: str, model_version: str = "", timeout: float | None = None
    ) -> pb.ModelMetadataResponse:
        return self._call("ModelMetadata", pb.ModelMetadataRequest(name=model_name, version=model_version), timeout)

    def get_model_config(
        self, model_name: str, model_version: str = "", timeout: float | None = None
    ) -> pb.ModelConfigResponse:
        return self._call("ModelConfig", pb.ModelConfigRequest(name=model_name, version=model_version), timeout)

    def get_inference_statistics(
        self, model_name: str = "", model_version: str = "", timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        return self._call("ModelStatistics", pb.ModelStatisticsRequest(name=model_name, version=model_version), timeout)

    def get_model_repository_index(
        self, ready: bool = False, timeout: float | None = None
    ) -> pb.RepositoryIndexResponse:
        return self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), timeout)

    def load_model(self, model_name: str, timeout: float | None = None) -> None:
        self._call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=model_name), timeout)

    def unload_model(self, model_name: str, timeout: float | None = None) -> None:
        self._call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model_name), timeout)

    def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """One ModelInfer call; `timeout` (seconds) is the gRPC deadline, which the server honours."""
        request = build_infer_request(model_name, inputs, outputs, model_version, request_id, parameters)
        return parse_infer_response(self._call("ModelInfer", request, timeout))

    def stream_infer(
        self, requests: Iterable[pb.ModelInferRequest], timeout: float | None = None
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """ModelStreamInfer: yields (request id, outputs) as each request finishes, which may not be the
        order sent (give requests ids, see `build_infer_request`); a failed request raises."""
        try:
            for reply in self._stub.ModelStreamInfer(iter(requests), timeout=timeout):
                yield _stream_result(reply)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc(exc) from None

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """grpc.health.v1 status of `service` ("" = the whole server): SERVING, NOT_SERVING, ..."""
        try:
            return _health_status(self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout))
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc(exc) from None


# ---- asyncio ------------------------------------------------------------------------------------------


class AsyncInferenceClient(AsyncClient):
    """asyncio client over grpc.aio, the same methods as `InferenceClient`, awaited."""

    stub_type = pb_grpc.GRPCInferenceServiceStub

    def __init__(
        self,
        url: str = DEFAULT_URL,
        channel: grpc.aio.Channel | None = None,
        *,
        tls: ClientTLS | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(url, channel, tls=tls, headers=headers)
        self._health: Any = health_pb2_grpc.HealthStub(self.channel)  # its stubs leave out Check

    async def is_server_live(self, timeout: float | None = None) -> bool:
        return (await self._call("ServerLive", pb.ServerLiveRequest(), timeout)).live

    async def is_server_ready(self, timeout: float | None = None) -> bool:
        return (await self._call("ServerReady", pb.ServerReadyRequest(), timeout)).ready

    async def is_model_ready(self, model_name: str, model_version: str = "", timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model_name, version=model_version)
        return (await self._call("ModelReady", request, timeout)).ready

    async def get_server_metadata(self, timeout: float | None = None) -> pb.ServerMetadataResponse:
        return await self._call("ServerMetadata", pb.ServerMetadataRequest(), timeout)

    async def get_model_metadata(
        self, model_name: str, model_version: str = "", timeout: float | None = None
    ) -> pb.ModelMetadataResponse:
        return await self._call(
            "ModelMetadata", pb.ModelMetadataRequest(name=model_name, version=model_version), timeout
        )

    async def get_model_config(
        self, model_name: str, model_version: str = "", timeout: float | None = None
    ) -> pb.ModelConfigResponse:
        return await self._call("ModelConfig", pb.ModelConfigRequest(name=model_name, version=model_version), timeout)

    async def get_inference_statistics(
        self, model_name: str = "", model_version: str = "", timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        request = pb.ModelStatisticsRequest(name=model_name, version=model_version)
        return await self._call("ModelStatistics", request, timeout)

    async def get_model_repository_index(
        self, ready: bool = False, timeout: float | None = None
    ) -> pb.RepositoryIndexResponse:
        return await self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), timeout)

    async def load_model(self, model_name: str, timeout: float | None = None) -> None:
        await self._call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=model_name), timeout)

    async def unload_model(self, model_name: str, timeout: float | None = None) -> None:
        await self._call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model_name), timeout)

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        request = build_infer_request(model_name, inputs, outputs, model_version, request_id, parameters)
        return parse_infer_response(await self._call("ModelInfer", request, timeout))

    async def stream_infer(
        self, requests: Iterable[pb.ModelInferRequest], timeout: float | None = None
    ) -> AsyncIterator[tuple[str, dict[str, np.ndarray]]]:
        try:
            async for reply in self._stub.ModelStreamInfer(iter(requests), timeout=timeout):
                yield _stream_result(reply)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc(exc) from None

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            return _health_status(await self._health.Check(request, timeout=timeout))
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc(exc) from None
