"""The KServe v2 REST binding (aiohttp, on the event loop grpc.aio runs on).

It only translates. Inference goes through the request path (server/request.py: the same checks, the
same batchers, the same statistics as ModelInfer); every other endpoint calls the gRPC servicer's own
method with the protobuf request the URL describes and answers its response as JSON
(cnncore.protojson: numbers as numbers). Failures are `InferError`s answered with
`InferError.http_status` and the v2 error body `{"error": "..."}`; access keys, TLS and limits are the
same objects the gRPC binding uses.

Routes (Triton's, so `tritonclient.http` works unchanged):

    GET  /v2/health/live | /v2/health/ready                       200, or 400 (the protocol's "false")
    GET  /v2                                                      server metadata
    GET  /v2/models/{m}[/versions/{v}]                            model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready                      200 / 400
    GET  /v2/models/{m}[/versions/{v}]/config                     model configuration
    GET  /v2/models[/{m}[/versions/{v}]]/stats                    statistics
    POST /v2/models/{m}[/versions/{v}]/infer                      JSON tensors, binary-data extension
    POST /v2/repository/index | /v2/repository/models/{m}/load | .../unload
    GET  /v2/systemsharedmemory[/region/{r}]/status; POST .../region/{r}/register, [.../region/{r}]/unregister
    POST /v2/vision/models/{m}[/versions/{v}]/{classify|detect|segment|encode|reconstruct}
         one picture as the body (image/*, application/octet-stream) or several as multipart/form-data;
         options as query parameters (top_k, score_threshold, max_detections); answers the JSON
         `python -m client` prints, with PNG fields (mask_png, image_png) in base64

Binary-data extension: with `Inference-Header-Content-Length: N` the first N bytes of the body are the
JSON header and the rest holds, in input order, the raw bytes of each input whose parameters carry
`binary_data_size`. Outputs asked for with `binary_data: true` (or all, with the request parameter
`binary_data_output: true`, what tritonclient sends when it names no outputs) come back the same way.
Inputs and outputs may instead name a system shared-memory region (`shared_memory_region`,
`shared_memory_byte_size`, `shared_memory_offset`), the registry the gRPC binding uses.

Limits: bodies over --http-max-input-size are refused (413) from their Content-Length before they are
read, or as soon as they pass it; a body must arrive within --http-body-timeout-secs (408, connection
closed), so a client that trickles its bytes holds a request slot for that long at most; a connection
that never completes its request line and headers is closed after --http-idle-timeout-secs; header lines
and fields are capped at --http-max-header-bytes (aiohttp answers 400).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np
from aiohttp import web

from cnncore.datatypes import from_numpy
from cnncore.protojson import message_to_dict
from cnncore.wire import serialize_bytes
from protos import grpc_service_pb2 as pb
from protos import vision_pb2 as vpb
from server.access import AccessPolicy
from server.boundary import status_of
from server.classification import class_counts, classify
from server.errors import InferError, invalid
from server.model_overrides import load_request_from_json, unload_request_from_json
from server.protocol_checks import check_json_keys, check_json_request
from server.repository import ModelRepository
from server.request import RequestPath, ServerState
from server.service import InferenceServicer
from server.shared_memory import BYTE_SIZE, REGION, OutputTarget, SharedMemoryRegistry, output_target, tensor_source
from server.tensors import TensorIn
from server.tls import TlsFiles
from server.unsupported_apis import cuda_routes, unsupported
from server.vision_service import VisionService

log = logging.getLogger("cnnserve.http")

DEFAULT_MAX_INPUT_SIZE = 64 * 1024 * 1024  # Triton's --http-max-input-size default
DEFAULT_BODY_TIMEOUT_S = 30.0
# Above the idle timeouts of the load balancers in front (AWS ALB 60 s; nginx's upstream keep-alive 60 s):
# a server that closes an idle keep-alive connection first races the proxy's next request on it (502s).
DEFAULT_IDLE_TIMEOUT_S = 75.0
DEFAULT_MAX_HEADER_BYTES = 8190  # aiohttp's own default for a request line and for one header field
MAX_HEADERS = 128

HEADER_LENGTH = "Inference-Header-Content-Length"
# JSON above this is parsed in a worker thread: a 20 MB tensor written as JSON takes seconds to parse,
# which on the event loop would stall every other request and health probe.
_OFFLOAD_JSON_BYTES = 1 << 20
# What an infer body may be labelled: JSON, the binary-data extension, or nothing / curl's default form
# type (curl -d sends that unless told otherwise).
_INFER_TYPES = {"", "application/json", "application/octet-stream", "application/x-www-form-urlencoded",
                "text/plain"}
T = TypeVar("T")
VISION_RPCS = {"classify": "Classify", "detect": "Detect", "segment": "Segment", "encode": "Encode",
               "reconstruct": "Reconstruct"}


class HttpRefusal(Exception):
    """A refusal only HTTP has a status for (413 body too large, 408 body too slow, 400 unreadable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class HttpLimits:
    max_input_size: int = DEFAULT_MAX_INPUT_SIZE
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class _NoDeadline:
    """The servicer context of a REST call: HTTP carries no deadline (the `timeout` parameter does)."""

    def time_remaining(self) -> None:
        return None


_CTX = _NoDeadline()


def _flatten(data: Any, where: str) -> list:
    """v2 JSON `data` may be flat or nested as the shape; the request path takes it flat."""
    while data and isinstance(data, list) and isinstance(data[0], list):
        try:
            data = list(itertools.chain.from_iterable(data))
        except TypeError:  # [[1, 2], 3]: a number beside a list
            raise invalid(f"{where}: 'data' mixes lists and values at one nesting level") from None
    if not isinstance(data, list):
        data = [data]
    return data


def _field(obj: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in obj:
        if default is ...:
            raise invalid(f"{where}: '{key}' is required")
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise invalid(f"{where}: '{key}' must be {names}, got {type(value).__name__}")
    return value


def _parameters(obj: dict, where: str) -> dict[str, Any]:
    return _field(obj, "parameters", dict, where, {})


def _tensors_in(inputs: list, binary: memoryview, shm: SharedMemoryRegistry) -> list[TensorIn]:
    """JSON inputs (+ the binary section, or their shared-memory windows) as the request path's TensorIn,
    nothing decoded yet."""
    tensors: list[TensorIn] = []
    offset = 0
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise invalid(f"{where} must be an object, got {type(t).__name__}")
        name = _field(t, "name", str, where)
        where = f"input '{name}'"
        datatype = _field(t, "datatype", str, where)
        shape = _field(t, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise invalid(f"{where}: 'shape' must be a list of integers, got {shape!r:.80}")
        params = _parameters(t, where)
        size = params.get("binary_data_size")
        window = tensor_source(shm, name, params) if params else None
        if window is not None:
            if size is not None or "data" in t:
                raise invalid(f"{where}: a shared memory region and contents ('data' or binary data) given")
            tensors.append(TensorIn(name, datatype, tuple(shape), raw=window))
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid(f"{where}: parameters.binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise invalid(f"{where}: binary_data_size {size} runs past the binary data "
                              f"({len(binary) - offset} bytes left after the header)")
            tensors.append(TensorIn(name, datatype, tuple(shape), raw=binary[offset:offset + size]))
            offset += size
        elif "data" in t:
            tensors.append(TensorIn(name, datatype, tuple(shape), values=_flatten(t["data"], where),
                                   values_field="data"))
        else:
            raise invalid(f"{where}: neither 'data' nor parameters.binary_data_size given")
    if offset != len(binary):
        raise invalid(f"{len(binary)} bytes of binary data follow the JSON header, the inputs' "
                      f"binary_data_size add up to {offset}")
    return tensors


def _output_json(name: str, arr: np.ndarray, binary: bool, chunks: list[bytes | memoryview],
                 target: OutputTarget | None = None) -> dict[str, Any]:
    datatype = from_numpy(arr.dtype)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if target is not None:
        written = target.write(arr)
        entry["parameters"] = {REGION: target.region.name, BYTE_SIZE: written}
    elif binary:
        # The array's own memory goes to the socket: no bytes copy of a 600 KB tensor per answer.
        data = serialize_bytes(arr) if datatype == "BYTES" else memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        entry["parameters"] = {"binary_data_size": len(data)}
        chunks.append(data)
    elif datatype == "BYTES":
        try:
            entry["data"] = [bytes(v).decode() for v in arr.reshape(-1)]
        except UnicodeDecodeError:
            raise invalid(f"output '{name}' holds bytes that are not UTF-8 and cannot be JSON; "
                          "ask for it with parameters.binary_data: true") from None
    else:
        entry["data"] = arr.reshape(-1).tolist()
    return entry


class HttpBinding:
    def __init__(self, repository: ModelRepository, state: ServerState, policy: AccessPolicy | None = None,
                 limits: HttpLimits = HttpLimits(), vision_workers: int = 2) -> None:
        self.repository = repository
        self.state = state
        self.path = RequestPath(repository, state)
        self.grpc = InferenceServicer(repository, state)  # stateless: the same handlers gRPC runs
        self.vision = VisionService(self.path, workers=vision_workers)
        self.policy = policy
        self.limits = limits
        self.port = 0
        self._runner: web.AppRunner | None = None

    # -- plumbing ------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_input_size, middlewares=[self._errors])
        r = app.router
        m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], str]] = [
            ("GET", "/v2/health/live", self.live, "health"),
            ("GET", "/v2/health/ready", self.ready, "health"),
            ("GET", "/v2", self.server_metadata, "metadata"),
            ("GET", "/v2/models/stats", self.stats, "statistics"),
            ("POST", "/v2/repository/index", self.repository_index, "model-repository"),
            ("POST", "/v2/repository/models/{model}/load", self.load, "model-repository"),
            ("POST", "/v2/repository/models/{model}/unload", self.unload, "model-repository"),
            ("GET", "/v2/systemsharedmemory/status", self.shm_status, "shared-memory"),
            ("GET", "/v2/systemsharedmemory/region/{region}/status", self.shm_status, "shared-memory"),
            ("POST", "/v2/systemsharedmemory/region/{region}/register", self.shm_register, "shared-memory"),
            ("POST", "/v2/systemsharedmemory/unregister", self.shm_unregister, "shared-memory"),
            ("POST", "/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister, "shared-memory"),
        ] + cuda_routes(self.grpc)
        for base in (m, mv):
            routes += [
                ("GET", base, self.model_metadata, "metadata"),
                ("GET", base + "/ready", self.model_ready, "health"),
                ("GET", base + "/config", self.model_config, "model-config"),
                ("GET", base + "/stats", self.stats, "statistics"),
                ("POST", base + "/infer", self.infer, "inference"),
                ("POST", "/v2/vision" + base.removeprefix("/v2") + "/{rpc}", self.vision_call, "inference"),
            ]
        for method, path, handler, group in routes:
            r.add_route(method, path, self._guarded(handler, group))
        return app

    def _guarded(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]], group: str
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        policy = self.policy
        if not policy:
            return handler

        async def guarded(request: web.Request) -> web.StreamResponse:
            # Before the body is read: a refused request costs no parsing.
            denial = policy.check(group, lambda name: request.headers.getall(name, []))
            if denial is not None:
                return _error(denial.http_status, denial.message)
            return await handler(request)

        return guarded

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except InferError as exc:
            return _error(exc.http_status, exc.message, dict(exc.trailers) or None)
        except HttpRefusal as exc:
            response = _error(exc.status, exc.message)
            if exc.status in (408, 413):
                response.force_close()  # the rest of the body is never read: the connection cannot go on
            return response
        except web.HTTPException as exc:  # no route (404), wrong method (405), ...: the v2 error body too
            if exc.status < 400:
                raise
            if exc.status == 404 and (err := unsupported(request.path)) is not None:  # Triton's API, not ours
                return _error(err.http_status, err.message)
            return _error(exc.status, exc.reason, {k: v for k, v in exc.headers.items() if k == "Allow"})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: one request fails, the server serves on
            err = status_of(exc, f"HTTP {request.method} {request.path}")
            return _error(err.http_status, err.message)

    async def _read(self, request: web.Request, read: Callable[[], Awaitable[T]]) -> T:
        """`read()` of the body under the size cap and the body timeout."""
        limit = self.limits.max_input_size
        if request.content_length is not None and request.content_length > limit:
            raise HttpRefusal(413, f"request body of {request.content_length} bytes exceeds the limit of "
                                   f"{limit} bytes (--http-max-input-size)")
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                return await read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpRefusal(413, f"request body exceeds the limit of {limit} bytes (--http-max-input-size)") \
                from None
        except TimeoutError:
            raise HttpRefusal(408, f"request body not received within {self.limits.body_timeout_s:g} s "
                                   "(--http-body-timeout-secs)") from None

    async def _body(self, request: web.Request) -> bytes:
        return await self._read(request, request.read)

    async def _json(self, data: bytes | memoryview, what: str) -> Any:
        try:
            if len(data) > _OFFLOAD_JSON_BYTES:
                return await asyncio.to_thread(json.loads, bytes(data))
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpRefusal(400, f"{what} is not valid JSON: {exc}") from None
        except RecursionError:
            raise HttpRefusal(400, f"{what} nests too deeply") from None

    async def _json_object(self, request: web.Request, what: str) -> dict:
        """An optional JSON object body (repository calls): {} when empty."""
        body = await self._body(request)
        if not body.strip():
            return {}
        doc = await self._json(body, what)
        if not isinstance(doc, dict):
            raise invalid(f"{what} must be a JSON object, got {type(doc).__name__}")
        return doc

    @staticmethod
    def _model(request: web.Request) -> tuple[str, str]:
        return request.match_info["model"], request.match_info.get("version", "")

    # -- health, metadata, configuration, statistics ----------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.state.ready(self.repository) else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        answer = await self.grpc.ModelReady(pb.ModelReadyRequest(name=name, version=version), _CTX)
        return web.Response(status=200 if answer.ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(message_to_dict(await self.grpc.ServerMetadata(pb.ServerMetadataRequest(), _CTX)))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        answer = await self.grpc.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), _CTX)
        return web.json_response(message_to_dict(answer))

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        answer = await self.grpc.ModelConfig(pb.ModelConfigRequest(name=name, version=version), _CTX)
        return web.json_response(message_to_dict(answer.config))

    async def stats(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        answer = await self.grpc.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version), _CTX)
        return web.json_response(message_to_dict(answer))

    # -- repository ------------------------------------------------------------------------------------------
    async def repository_index(self, request: web.Request) -> web.Response:
        doc = await self._json_object(request, "repository index request")
        check_json_keys(doc, "repository index request")
        ready = _field(doc, "ready", bool, "repository index request", False)
        answer = await self.grpc.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), _CTX)
        return web.json_response([{k: v for k, v in m.items() if v != ""}
                                  for m in message_to_dict(answer)["models"]])

    async def load(self, request: web.Request) -> web.Response:
        doc = await self._json_object(request, "load request")
        await self.grpc.RepositoryModelLoad(load_request_from_json(request.match_info["model"], doc), _CTX)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        doc = await self._json_object(request, "unload request")
        await self.grpc.RepositoryModelUnload(unload_request_from_json(request.match_info["model"], doc), _CTX)
        return web.Response(status=200)

    # -- system shared memory -----------------------------------------------------------------------------------
    async def shm_status(self, request: web.Request) -> web.Response:
        answer = await self.grpc.SystemSharedMemoryStatus(
            pb.SystemSharedMemoryStatusRequest(name=request.match_info.get("region", "")), _CTX)
        return web.json_response([message_to_dict(r) for r in answer.regions.values()])

    async def shm_register(self, request: web.Request) -> web.Response:
        doc = await self._json_object(request, "register request")
        check_json_keys(doc, "register request")
        where = "register request"
        offset, size = _field(doc, "offset", int, where, 0), _field(doc, "byte_size", int, where)
        if offset < 0 or size < 0:
            raise invalid(f"{where}: 'offset' and 'byte_size' must not be negative")
        await self.grpc.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name=request.match_info["region"], key=_field(doc, "key", str, where), offset=offset, byte_size=size), _CTX)
        return web.Response(status=200)

    async def shm_unregister(self, request: web.Request) -> web.Response:
        await self.grpc.SystemSharedMemoryUnregister(
            pb.SystemSharedMemoryUnregisterRequest(name=request.match_info.get("region", "")), _CTX)
        return web.Response(status=200)

    # -- inference -------------------------------------------------------------------------------------------
    async def infer(self, request: web.Request) -> web.Response:
        received = time.perf_counter_ns()
        if request.content_type.lower() not in _INFER_TYPES:
            raise HttpRefusal(400, f"infer takes application/json (or the binary-data extension as "
                                   f"application/octet-stream), got Content-Type {request.content_type!r:.80}")
        name, version = self._model(request)
        # Admitted on the declared length, before the body is read, as gRPC admits on the received size
        # (a chunked body declares none; --http-max-input-size still bounds it).
        with self.state.accepted(request.content_length or 0):
            body = await self._body(request)
            header_len = request.headers.get(HEADER_LENGTH)
            if header_len is None:
                header, binary = body, memoryview(b"")
            else:
                try:
                    n = int(header_len)
                except ValueError:
                    n = -1
                if not 0 <= n <= len(body):
                    raise HttpRefusal(400, f"{HEADER_LENGTH} {header_len!r:.40} is not a length within the "
                                           f"{len(body)}-byte body")
                view = memoryview(body)
                header, binary = view[:n], view[n:]
            doc = await self._json(header, "inference request")
            if not isinstance(doc, dict):
                raise invalid(f"inference request must be a JSON object, got {type(doc).__name__}")
            check_json_request(doc)
            inputs = _field(doc, "inputs", list, "inference request")
            outputs = _field(doc, "outputs", list, "inference request", [])
            params = _parameters(doc, "inference request")
            request_id = _field(doc, "id", str, "inference request", "")
            binary_default = bool(params.get("binary_data_output", False))
            shm = self.state.shared_memory
            wanted: dict[str, bool] = {}
            targets: dict[str, OutputTarget] = {}
            for i, o in enumerate(outputs):
                if not isinstance(o, dict):
                    raise invalid(f"outputs[{i}] must be an object, got {type(o).__name__}")
                out_name = _field(o, "name", str, f"outputs[{i}]")
                out_params = _parameters(o, f"output '{out_name}'")
                wanted[out_name] = bool(out_params.get("binary_data", binary_default))
                if out_params and (target := output_target(shm, out_name, out_params)) is not None:
                    targets[out_name] = target
            counts = class_counts((o["name"], o.get("parameters", {})) for o in outputs)
            normalized = await self.path.normalize(
                name, version, _tensors_in(inputs, binary, shm), outputs=list(wanted), parameters=params,
                request_id=request_id, received_ns=received)
            results = classify(normalized.model, await self.path.infer(normalized), counts)
            chunks: list[bytes | memoryview] = []
            out_json = [_output_json(o, results[o], wanted.get(o, binary_default), chunks, targets.get(o))
                        for o in normalized.outputs]
            model = normalized.model
            answer: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
            if request_id:
                answer["id"] = request_id
            answer["outputs"] = out_json
            head = json.dumps(answer).encode()
            if not chunks:
                response = web.Response(body=head, content_type="application/json")
                # JSON tensors compress well, so honour Accept-Encoding (tritonclient's
                # response_compression_algorithm). Binary outputs are sent as they are: float data
                # barely compresses, and deflating a 600 KB tensor costs ~60 ms of a core, which
                # clients that send Accept-Encoding by default (aiohttp's) would pay on every call.
                response.enable_compression()
                return response
            response = web.StreamResponse(headers={HEADER_LENGTH: str(len(head)),
                                                   "Content-Type": "application/octet-stream"})
            response.content_length = len(head) + sum(len(c) for c in chunks)
            await response.prepare(request)
            for part in (head, *chunks):
                await response.write(part)
            await response.write_eof()
            return response

    # -- the vision API --------------------------------------------------------------------------------------
    async def vision_call(self, request: web.Request) -> web.Response:
        rpc = VISION_RPCS.get(request.match_info["rpc"])
        if rpc is None:
            raise web.HTTPNotFound(reason=f"no vision call '{request.match_info['rpc']}'; calls are "
                                          f"{', '.join(VISION_RPCS)}")
        name, version = self._model(request)
        q = request.query
        options: dict[str, Any] = {}
        try:  # the options first: a bad one is refused before the pictures are read
            if rpc == "Classify" and "top_k" in q:
                options["top_k"] = int(q["top_k"])
            if rpc == "Detect":
                options["score_threshold"] = float(q.get("score_threshold", 0.5))
                options["max_detections"] = int(q.get("max_detections", 0))
        except ValueError as exc:
            raise invalid(f"{rpc}: a query parameter is not a number: {exc}") from None
        for key in ("top_k", "max_detections"):
            if key in options and not 0 <= options[key] < 2**32:
                raise invalid(f"{rpc}: query parameter {key} must be in [0, 2^32), got {options[key]}")
        images, sources = await self._images(request)
        message = getattr(vpb, f"{rpc}Request")(model_name=name, model_version=version, images=images, **options)
        answer = await getattr(self.vision, rpc)(message, _CTX)
        out = message_to_dict(answer, bytes_as="base64")
        for result, source in zip(out["results"], sources):
            if source:
                result["source"] = source
        return web.json_response(out)

    async def _images(self, request: web.Request) -> tuple[list[bytes], list[str]]:
        """The pictures of a vision request: the body itself, or every file part of a multipart form."""
        ctype = request.content_type.lower()
        if ctype == "multipart/form-data":
            try:
                form = await self._read(request, request.post)
            except ValueError as exc:
                raise HttpRefusal(400, f"unreadable multipart/form-data body: {exc}") from None
            files = [v for v in form.values() if isinstance(v, web.FileField)]
            if not files:
                raise invalid("the multipart form has no file parts; send each picture as a file")
            return [f.file.read() for f in files], [f.filename or "" for f in files]
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return [await self._body(request)], [""]
        raise HttpRefusal(400, f"vision calls take a picture (image/*, application/octet-stream) or "
                               f"multipart/form-data, got Content-Type {request.content_type!r:.80}")

    # -- life cycle ------------------------------------------------------------------------------------------
    async def start(self, address: str, port: int, tls: TlsFiles | None, reuse_port: bool = False) -> int:
        runner = web.AppRunner(
            self.app(), handle_signals=False, access_log=None,
            shutdown_timeout=1.0,  # stop() runs after the drain: no inference is left in flight
            keepalive_timeout=self.limits.idle_timeout_s,
            # After an answer that left the body unread (413, 408, a refused key), aiohttp drains the rest
            # so the client reads the answer rather than a reset; 10 s by default, 1 s here.
            lingering_time=1.0,
            # aiohttp pauses the socket each time 2x this much body is buffered unread; 64 KiB (its
            # default) means a dozen pause/resume cycles and loop wake-ups per 600 KB tensor.
            read_bufsize=1 << 20, max_line_size=self.limits.max_header_bytes,
            max_field_size=self.limits.max_header_bytes, max_headers=MAX_HEADERS)
        await runner.setup()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = socket.create_server((address.strip("[]"), port), family=family, backlog=1024,
                                      reuse_port=reuse_port)  # --workers share the port
        except OSError as exc:
            await runner.cleanup()
            raise SystemExit(f"could not bind HTTP to {address}:{port}: {exc.strerror or exc}") from None
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock, ssl_context=tls.reloading_ssl_context() if tls else None).start()
        self._runner = runner
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.vision.close()

