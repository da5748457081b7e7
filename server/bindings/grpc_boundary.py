"""The gRPC bindings' error boundary: how every RPC answers a failure, in one place.

`guard_servicer` registers a generated servicer with each method wrapped once, at start-up: an
`InferError` becomes its gRPC status (with its trailers), cancellation and aborts pass through, and
anything else is logged with the RPC's name and answered INTERNAL for that one call, never a crashed
server. Handlers therefore only raise; none of them calls `context.abort` itself. Request messages that
do not parse reach the handler as `_Malformed` (gRPC would answer its deserializer's exception UNKNOWN)
and are answered INVALID_ARGUMENT here. The REST bindings map the same `InferError` through
`InferError.http_status`; `server.errors.status_of` is what both use for an exception that is not one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import grpc

from server.errors import InferError, invalid, status_of

# Any request and response message: the boundary wraps every method of every service alike. Quoted:
# the stubs make these generic, grpc's runtime classes are not subscriptable.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behaviour: TypeAlias = Callable[..., Any]


class _Malformed:
    """A request message its deserializer could not parse; the guarded handler refuses it."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:  # the handler takes the bytes itself (ModelInfer)
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError and whatever a custom deserializer raises
            return _Malformed(f"{type(exc).__name__}: {exc}")

    return deserialize


def _parsed(request: Any, rpc: str) -> Any:
    if isinstance(request, _Malformed):
        raise invalid(f"{rpc}: malformed request message ({request.error})")
    return request


async def _parsed_stream(requests: AsyncIterator[Any], rpc: str) -> AsyncIterator[Any]:
    async for request in requests:
        yield _parsed(request, rpc)


def _checked(request: Any, rpc: str, streaming_request: bool) -> Any:
    return _parsed_stream(request, rpc) if streaming_request else _parsed(request, rpc)


async def _abort(context: Context, err: InferError) -> None:
    if err.trailers:
        context.set_trailing_metadata(err.trailers)
    await context.abort(err.code, err.message)


def _guard_unary(fn: Behaviour, rpc: str, streaming_request: bool = False) -> Behaviour:
    async def behaviour(request: Any, context: Context) -> Any:
        try:
            return await fn(_checked(request, rpc, streaming_request), context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the boundary: every failure is answered here
            await _abort(context, status_of(exc, rpc))

    return behaviour


def _guard_streaming(fn: Behaviour, rpc: str, streaming_request: bool = False) -> Behaviour:
    async def behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for item in fn(_checked(request, rpc, streaming_request), context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, status_of(exc, rpc))

    return behaviour


def guard_handler(handler: Handler, rpc: str) -> Handler:
    """The same handler with its behaviour wrapped by the boundary."""
    deserialize = _tolerant(handler.request_deserializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary(handler.unary_unary, rpc), deserialize, handler.response_serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _guard_streaming(handler.unary_stream, rpc), deserialize, handler.response_serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _guard_unary(handler.stream_unary, rpc, streaming_request=True), deserialize, handler.response_serializer
        )
    if handler.stream_stream is None:  # grpc's handlers carry exactly one of the four behaviours
        raise ValueError(f"{rpc}: the method handler has no behaviour")
    return grpc.stream_stream_rpc_method_handler(
        _guard_streaming(handler.stream_stream, rpc, streaming_request=True), deserialize, handler.response_serializer
    )


class _HandlerCapture:
    """Stands in for the server so a generated `add_*Servicer_to_server` hands over its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.service, self.handlers = service, dict(handlers)


def guard_servicer(
    server: grpc.aio.Server,
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    overrides: dict[str, Handler] | None = None,
) -> str:
    """Register `servicer` (through its generated `add_to_server`) with every method behind the
    boundary; `overrides` replaces generated handlers (e.g. ModelInfer taking raw bytes). Returns the
    full service name (for reflection and health)."""
    capture = _HandlerCapture()
    add_to_server(servicer, capture)
    handlers = {**capture.handlers, **(overrides or {})}
    guarded = {name: guard_handler(h, f"{capture.service.rsplit('.', 1)[-1]}/{name}") for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, guarded),))
    server.add_registered_method_handlers(capture.service, guarded)
    return capture.service
