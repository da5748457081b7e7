"""Triton APIs this server answers without implementing them, alike on both protocols.

CUDA shared memory: no region can exist here, so status lists none and unregister (a client's cleanup,
e.g. perf_analyzer's on exit) succeeds, as a Triton with no region registered answers; register is
refused UNIMPLEMENTED / 501. The gRPC servicer answers the RPCs (server/service.py); `cuda_routes` gives
the REST binding Triton's URLs for them, calling the same servicer methods.

Other Triton endpoints with no handler here (generate, and any of Triton's extensions a build lacks a
handler for) are answered 501 with the v2 error body, not a bare 404: the status Triton's HTTP server gives
an UNSUPPORTED error, and what gRPC answers (UNIMPLEMENTED) for an RPC it does not serve. Paths that are
no Triton API at all stay 404.
"""
from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

import grpc
from aiohttp import web

from cnncore.protojson import message_to_dict
from protos import grpc_service_pb2 as pb
from server.errors import InferError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_MODEL = r"/v2/models/[^/]+(?:/versions/[^/]+)?"
# Triton REST endpoints (extension name, path pattern) that may have no handler here.
TRITON_ENDPOINTS: list[tuple[str, re.Pattern[str]]] = [
    ("generate", re.compile(_MODEL + r"/generate(?:_stream)?")),
    ("trace", re.compile(r"/v2/trace/setting|" + _MODEL + r"/trace/setting")),
    ("logging", re.compile(r"/v2/logging")),
]


def unsupported(path: str) -> InferError | None:
    """UNIMPLEMENTED (501) for a Triton API path that no route served; None for any other path."""
    for api, pattern in TRITON_ENDPOINTS:
        if pattern.fullmatch(path):
            return InferError(grpc.StatusCode.UNIMPLEMENTED,
                              f"the {api} API ({path}) is not supported by this server")
    return None


class _NoDeadline:
    def time_remaining(self) -> None:
        return None


def cuda_routes(servicer: Any) -> list[tuple[str, str, Handler, str]]:
    """Triton's /v2/cudasharedmemory routes (method, path, handler, access group), answered by `servicer`
    (the gRPC InferenceServicer) as its CUDA RPCs answer."""
    ctx = _NoDeadline()

    async def status(request: web.Request) -> web.Response:
        answer = await servicer.CudaSharedMemoryStatus(
            pb.CudaSharedMemoryStatusRequest(name=request.match_info.get("region", "")), ctx)
        return web.json_response([message_to_dict(r) for r in answer.regions.values()])

    async def register(request: web.Request) -> web.Response:
        await servicer.CudaSharedMemoryRegister(
            pb.CudaSharedMemoryRegisterRequest(name=request.match_info["region"]), ctx)
        return web.Response(status=200)

    async def unregister(request: web.Request) -> web.Response:
        await servicer.CudaSharedMemoryUnregister(
            pb.CudaSharedMemoryUnregisterRequest(name=request.match_info.get("region", "")), ctx)
        return web.Response(status=200)

    base = "/v2/cudasharedmemory"
    return [
        ("GET", base + "/status", status, "shared-memory"),
        ("GET", base + "/region/{region}/status", status, "shared-memory"),
        ("POST", base + "/region/{region}/register", register, "shared-memory"),
        ("POST", base + "/unregister", unregister, "shared-memory"),
        ("POST", base + "/region/{region}/unregister", unregister, "shared-memory"),
    ]
