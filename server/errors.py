"""The project's one error type, and its one mapping to each binding's status.

Anything below the bindings (the request normalizer, the repository, the batcher, the backends' input
checks) raises `InferError` with a gRPC status code, the code set the protocol is specified in. The
error boundary (server/boundary.py) turns it into the gRPC status, the REST binding into the HTTP
status from `HTTP_STATUS`; nothing else decides how a failure is answered.
"""
from __future__ import annotations

import grpc

# What an error text may echo of a client's input (a name, a version): a 10 KB model name in a status
# message would exceed what stock clients accept in trailing metadata (8 KB).
ECHO_LIMIT = 128

# gRPC status -> HTTP status for the KServe v2 REST binding. The classes Triton's errors have are mapped
# as Triton's HTTP server maps them (HttpCodeFromError: INTERNAL 500, NOT_FOUND 404, UNAVAILABLE 503,
# UNSUPPORTED 501, UNKNOWN / INVALID_ARG / ALREADY_EXISTS / CANCELLED 400); the codes only this server
# raises (admission's RESOURCE_EXHAUSTED, access keys, deadlines) as Google's canonical gRPC/HTTP mapping.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 400,
    grpc.StatusCode.UNKNOWN: 400,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class InferError(Exception):
    """A failure with the status it is answered with; `trailers` travel as gRPC trailing metadata
    (and HTTP headers), e.g. the retry pushback of a refused request."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def echo(text: object, limit: int = ECHO_LIMIT) -> str:
    """`text` as an error message may quote it: repr'd, and cut to `limit` characters with the length
    said, so a hostile name can neither bloat a status message nor hide control characters in it."""
    s = str(text)
    if len(s) <= limit:
        return repr(s)
    return repr(s[:limit]) + f"... ({len(s)} characters)"


def invalid(message: str) -> InferError:
    return InferError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> InferError:
    return InferError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> InferError:
    return InferError(grpc.StatusCode.UNAVAILABLE, message)


def failed_precondition(message: str) -> InferError:
    return InferError(grpc.StatusCode.FAILED_PRECONDITION, message)


def internal(message: str) -> InferError:
    return InferError(grpc.StatusCode.INTERNAL, message)
