"""The project's one error type, and its one mapping to each binding's status.

Anything below the bindings (the data plane's Normalize, the repository, the batcher, the backends'
input checks) raises `InferError` with a gRPC status code, the code set the protocol is specified in;
`status_of` turns any other exception into INTERNAL, logged. The gRPC binding answers the code itself
(server/bindings/grpc_boundary.py); every HTTP answer (the REST bindings' and access-key refusals
alike) takes its status from `InferError.http_status`, i.e. from `HTTP_STATUS`, the one table. A
refusal only HTTP has a status for (413 body too large, 408 body too slow) is an `InferError` with
the nearest gRPC code and that status given explicitly.
"""

from __future__ import annotations

import logging

import grpc

# What an error text may echo of a client's input (a name, a version): a 10 KB model name in a status
# message would exceed what stock clients accept in trailing metadata (8 KB).
ECHO_LIMIT = 128

log = logging.getLogger("cnnserve.errors")

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

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        trailers: tuple[tuple[str, str], ...] = (),
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers
        self._http_status = http_status

    @property
    def http_status(self) -> int:
        return self._http_status if self._http_status is not None else HTTP_STATUS.get(self.code, 500)


def status_of(exc: BaseException, where: str) -> InferError:
    """The InferError a failure is answered with; unexpected exceptions are logged (naming `where`, an
    RPC or a route) and become INTERNAL. Every binding's last resort."""
    if isinstance(exc, InferError):
        return exc
    log.error("%s failed", where, exc_info=(type(exc), exc, exc.__traceback__), extra={"rpc": where})
    return InferError(grpc.StatusCode.INTERNAL, f"{where}: internal error: {type(exc).__name__}: {exc}")


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
