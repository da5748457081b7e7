"""Triton APIs this server answers without implementing them, alike on both protocols.

CUDA shared memory: no region can exist here, so status lists none and unregister (a client's cleanup,
e.g. perf_analyzer's on exit) succeeds, as a Triton with no region registered answers; register is
refused UNIMPLEMENTED / 501. The data plane holds those answers (`DataPlane.cuda_*`), which the gRPC
binding's CUDA RPCs and the KServe v2 REST binding's /v2/cudasharedmemory routes (rest_v2.py) both give.

Other Triton endpoints with no handler here (generate, and any of Triton's extensions a build lacks a
handler for) are answered 501 with the v2 error body, not a bare 404: the status Triton's HTTP server gives
an UNSUPPORTED error, and what gRPC answers (UNIMPLEMENTED) for an RPC it does not serve. Paths that are
no Triton API at all stay 404. The REST server's error middleware (rest.py) asks `unsupported` about
every 404, so an endpoint that gains a handler needs no change here.
"""

from __future__ import annotations

import re

import grpc

from server.errors import InferError

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
            return InferError(grpc.StatusCode.UNIMPLEMENTED, f"the {api} API ({path}) is not supported by this server")
    return None
