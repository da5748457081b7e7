"""The KServe v2 REST binding: HTTP routes over the data plane (server/dataplane/plane.py).

It only translates: each route reads its URL and body into data-plane calls (the same checks, batchers
and statistics as the gRPC binding's) and answers the result as JSON; metadata, statistics and the
repository index are the protocol's messages (server/bindings/v2_messages.py) as JSON
(cnncore.protojson: numbers as numbers). Errors, access keys and body limits are the REST server's
(server/bindings/rest.py).

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
    GET  /v2/cudasharedmemory[/region/{r}]/status; POST ...: the same, answered as the gRPC CUDA RPCs
         (no region can exist here: server/bindings/unsupported_apis.py)
    (the vision API's routes, /v2/vision/..., are their own binding: server/bindings/rest_vision.py)

Binary-data extension: with `Inference-Header-Content-Length: N` the first N bytes of the body are the
JSON header and the rest holds, in input order, the raw bytes of each input whose parameters carry
`binary_data_size`. Outputs asked for with `binary_data: true` (or all, with the request parameter
`binary_data_output: true`, what tritonclient sends when it names no outputs) come back the same way.
Inputs and outputs may instead name a system shared-memory region (`shared_memory_region`,
`shared_memory_byte_size`, `shared_memory_offset`), the registry the gRPC binding uses.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from aiohttp import web

from cnncore.datatypes import from_numpy
from cnncore.protojson import message_to_dict
from server.bindings import v2_messages as v2
from server.bindings.http_body import tensor_values, uint64_field
from server.bindings.rest import RestBody, RestRoute, field
from server.dataplane.normalize import OutputIn
from server.dataplane.plane import DataPlane, OutputTensor
from server.dataplane.protocol_checks import check_json_keys, check_json_request
from server.dataplane.tensors import TensorIn, raw_view
from server.errors import invalid
from server.model_overrides import check_unload, load_override, load_request_from_json, unload_request_from_json
from server.shared_memory import BYTE_SIZE, REGION

HEADER_LENGTH = "Inference-Header-Content-Length"
# What an infer body may be labelled: JSON, the binary-data extension, or nothing / curl's default form
# type (curl -d sends that unless told otherwise).
_INFER_TYPES = {"", "application/json", "application/octet-stream", "application/x-www-form-urlencoded", "text/plain"}


def _flatten(data: Any, where: str) -> list[Any]:
    """v2 JSON `data` may be flat or nested as the shape; the data plane takes it flat."""
    while data and isinstance(data, list) and isinstance(data[0], list):
        try:
            data = list(itertools.chain.from_iterable(data))
        except TypeError:  # [[1, 2], 3]: a number beside a list
            raise invalid(f"{where}: 'data' mixes lists and values at one nesting level") from None
    if isinstance(data, list):
        return data
    return [data]


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params: dict[str, Any] = field(obj, "parameters", dict, where, {})
    return params


def _tensors_in(inputs: list[Any], binary: memoryview) -> list[TensorIn]:
    """JSON inputs (+ their slices of the binary section) as the data plane's TensorIn, nothing decoded
    yet; which sources an input may give, and its shared-memory region, the data plane checks."""
    tensors: list[TensorIn] = []
    offset = 0
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise invalid(f"{where} must be an object, got {type(t).__name__}")
        name = field(t, "name", str, where)
        where = f"input '{name}'"
        datatype = field(t, "datatype", str, where)
        shape = field(t, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise invalid(f"{where}: 'shape' must be a list of integers, got {shape!r:.80}")
        params = _parameters(t, where)
        size = params.get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid(f"{where}: parameters.binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise invalid(
                    f"{where}: binary_data_size {size} runs past the binary data "
                    f"({len(binary) - offset} bytes left after the header)"
                )
            raw = binary[offset : offset + size]
            offset += size
        values = tensor_values(_flatten(t["data"], where), datatype, where) if "data" in t else None
        tensors.append(
            TensorIn(
                name,
                datatype,
                tuple(shape),
                raw=raw,
                values=values,
                values_field="data",
                raw_field="parameters.binary_data_size",
                parameters=params,
            )
        )
    if offset != len(binary):
        raise invalid(
            f"{len(binary)} bytes of binary data follow the JSON header, the inputs' "
            f"binary_data_size add up to {offset}"
        )
    return tensors


def _output_json(o: OutputTensor, binary: bool, chunks: list[bytes | memoryview]) -> dict[str, Any]:
    arr = o.array
    datatype = from_numpy(arr.dtype)
    entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": list(arr.shape)}
    if o.region is not None:
        entry["parameters"] = {REGION: o.region, BYTE_SIZE: o.written}
    elif binary:
        # The array's own memory goes to the socket: no bytes copy of a 600 KB tensor per answer.
        data = raw_view(arr)
        entry["parameters"] = {"binary_data_size": len(data)}
        chunks.append(data)
    elif datatype == "BYTES":
        try:
            entry["data"] = [bytes(v).decode() for v in arr.reshape(-1)]
        except UnicodeDecodeError:
            raise invalid(
                f"output '{o.name}' holds bytes that are not UTF-8 and cannot be JSON; "
                "ask for it with parameters.binary_data: true"
            ) from None
    else:
        entry["data"] = arr.reshape(-1).tolist()
    return entry


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


class KServeV2Routes:
    def __init__(self, plane: DataPlane, body: RestBody) -> None:
        self.plane = plane
        self.body = body

    def routes(self) -> list[RestRoute]:
        m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        routes = [
            RestRoute("GET", "/v2/health/live", self.live, "health"),
            RestRoute("GET", "/v2/health/ready", self.ready, "health"),
            RestRoute("GET", "/v2", self.server_metadata, "metadata"),
            RestRoute("GET", "/v2/models/stats", self.stats, "statistics"),
            RestRoute("POST", "/v2/repository/index", self.repository_index, "model-repository"),
            RestRoute("POST", "/v2/repository/models/{model}/load", self.load, "model-repository"),
            RestRoute("POST", "/v2/repository/models/{model}/unload", self.unload, "model-repository"),
            RestRoute("GET", "/v2/systemsharedmemory/status", self.shm_status, "shared-memory"),
            RestRoute("GET", "/v2/systemsharedmemory/region/{region}/status", self.shm_status, "shared-memory"),
            RestRoute("POST", "/v2/systemsharedmemory/region/{region}/register", self.shm_register, "shared-memory"),
            RestRoute("POST", "/v2/systemsharedmemory/unregister", self.shm_unregister, "shared-memory"),
            RestRoute(
                "POST", "/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister, "shared-memory"
            ),
            RestRoute("GET", "/v2/cudasharedmemory/status", self.cuda_status, "shared-memory"),
            RestRoute("GET", "/v2/cudasharedmemory/region/{region}/status", self.cuda_status, "shared-memory"),
            RestRoute("POST", "/v2/cudasharedmemory/region/{region}/register", self.cuda_register, "shared-memory"),
            RestRoute("POST", "/v2/cudasharedmemory/unregister", self.cuda_unregister, "shared-memory"),
            RestRoute("POST", "/v2/cudasharedmemory/region/{region}/unregister", self.cuda_unregister, "shared-memory"),
        ]
        for base in (m, mv):
            routes += [
                RestRoute("GET", base, self.model_metadata, "metadata"),
                RestRoute("GET", base + "/ready", self.model_ready, "health"),
                RestRoute("GET", base + "/config", self.model_config, "model-config"),
                RestRoute("GET", base + "/stats", self.stats, "statistics"),
                RestRoute("POST", base + "/infer", self.infer, "inference"),
            ]
        return routes

    # -- health, metadata, configuration, statistics ----------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.plane.ready() else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.plane.model_ready(*_model(request)) else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(message_to_dict(v2.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = self.plane.model(*_model(request))
        return web.json_response(message_to_dict(v2.model_metadata(model, self.plane.versions(model))))

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(message_to_dict(self.plane.model(*_model(request)).config))

    async def stats(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return web.json_response(message_to_dict(v2.model_statistics(self.plane.statistics(name, version))))

    # -- repository ------------------------------------------------------------------------------------------
    async def repository_index(self, request: web.Request) -> web.Response:
        doc = await self.body.json_object(request, "repository index request")
        check_json_keys(doc, "repository index request")
        ready = field(doc, "ready", bool, "repository index request", False)
        answer = message_to_dict(v2.repository_index(self.plane.repository_index(ready)))
        return web.json_response([{k: v for k, v in m.items() if v != ""} for m in answer["models"]])

    async def load(self, request: web.Request) -> web.Response:
        doc = await self.body.json_object(request, "load request")
        name = request.match_info["model"]
        await self.plane.load(name, load_override(load_request_from_json(name, doc)))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        doc = await self.body.json_object(request, "unload request")
        check_unload(unload_request_from_json(request.match_info["model"], doc))
        await self.plane.unload(request.match_info["model"])
        return web.Response(status=200)

    # -- system shared memory -----------------------------------------------------------------------------------
    async def shm_status(self, request: web.Request) -> web.Response:
        answer = v2.region_status(self.plane.region_status(request.match_info.get("region", "")))
        return web.json_response([message_to_dict(r) for r in answer.regions.values()])

    async def shm_register(self, request: web.Request) -> web.Response:
        doc = await self.body.json_object(request, "register request")
        check_json_keys(doc, "register request")
        where = "register request"
        offset = uint64_field(field(doc, "offset", int, where, 0), "offset", where)
        size = uint64_field(field(doc, "byte_size", int, where), "byte_size", where)
        self.plane.register_region(request.match_info["region"], field(doc, "key", str, where), offset, size)
        return web.Response(status=200)

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self.plane.unregister_region(request.match_info.get("region", ""))
        return web.Response(status=200)

    # -- CUDA shared memory (the data plane's answers: no region can exist here) -----------------------------
    async def cuda_status(self, request: web.Request) -> web.Response:
        regions = self.plane.cuda_region_status(request.match_info.get("region", ""))
        return web.json_response([{"name": r.name, "byte_size": r.byte_size} for r in regions])

    async def cuda_register(self, request: web.Request) -> web.Response:
        self.plane.cuda_register_region(request.match_info["region"])
        return web.Response(status=200)

    async def cuda_unregister(self, request: web.Request) -> web.Response:
        self.plane.cuda_unregister_region(request.match_info.get("region", ""))
        return web.Response(status=200)

    # -- inference -------------------------------------------------------------------------------------------
    async def infer(self, request: web.Request) -> web.StreamResponse:
        received = time.perf_counter_ns()
        if request.content_type.lower() not in _INFER_TYPES:
            raise invalid(
                f"infer takes application/json (or the binary-data extension as "
                f"application/octet-stream), got Content-Type {request.content_type!r:.80}"
            )
        name, version = _model(request)
        # Admitted on the declared length, before the body is read, as gRPC admits on the received size
        # (a chunked body declares none; --http-max-input-size still bounds it).
        with self.plane.admitted(request.content_length or 0):
            body = await self.body.content(request)
            header_len = request.headers.get(HEADER_LENGTH)
            header: bytes | memoryview
            if header_len is None:
                header, binary = body, memoryview(b"")
            else:
                try:
                    n = int(header_len)
                except ValueError:
                    n = -1
                if not 0 <= n <= len(body):
                    raise invalid(
                        f"{HEADER_LENGTH} {header_len!r:.40} is not a length within the {len(body)}-byte body"
                    )
                view = memoryview(body)
                header, binary = view[:n], view[n:]
            doc = await self.body.json(header, "inference request")
            if not isinstance(doc, dict):
                raise invalid(f"inference request must be a JSON object, got {type(doc).__name__}")
            check_json_request(doc)
            inputs = field(doc, "inputs", list, "inference request")
            outputs = field(doc, "outputs", list, "inference request", [])
            params = _parameters(doc, "inference request")
            request_id = field(doc, "id", str, "inference request", "")
            binary_default = bool(params.get("binary_data_output", False))
            wanted: dict[str, bool] = {}
            outputs_in: list[OutputIn] = []
            for i, o in enumerate(outputs):
                if not isinstance(o, dict):
                    raise invalid(f"outputs[{i}] must be an object, got {type(o).__name__}")
                out_name = field(o, "name", str, f"outputs[{i}]")
                out_params = _parameters(o, f"output '{out_name}'")
                wanted[out_name] = bool(out_params.get("binary_data", binary_default))
                outputs_in.append(OutputIn(out_name, out_params))
            normalized = await self.plane.normalize(
                name,
                version,
                _tensors_in(inputs, binary),
                outputs=outputs_in,
                parameters=params,
                request_id=request_id,
                received_ns=received,
                protocol="http",
            )
            result = await self.plane.infer(normalized)
            chunks: list[bytes | memoryview] = []
            out_json = [_output_json(o, wanted.get(o.name, binary_default), chunks) for o in result.outputs]
            answer: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
            if request_id:
                answer["id"] = request_id
            answer["outputs"] = out_json
            head = json.dumps(answer).encode()
            if not chunks:
                plain = web.Response(body=head, content_type="application/json")
                # JSON tensors compress well, so honour Accept-Encoding (tritonclient's
                # response_compression_algorithm). Binary outputs are sent as they are: float data
                # barely compresses, and deflating a 600 KB tensor costs ~60 ms of a core, which
                # clients that send Accept-Encoding by default (aiohttp's) would pay on every call.
                plain.enable_compression()
                return plain
            response = web.StreamResponse(
                headers={HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
            )
            response.content_length = len(head) + sum(len(c) for c in chunks)
            await response.prepare(request)
            for part in (head, *chunks):
                await response.write(part)
            await response.write_eof()
            return response


def routes(plane: DataPlane, body: RestBody) -> list[RestRoute]:
    """The binding's registration (server.app.REST_BINDINGS)."""
    return KServeV2Routes(plane, body).routes()
