"""The error boundary: how every RPC of the server's services answers a failure, in one place.

`guard_servicer` registers a generated servicer with each method wrapped once, at start-up: an
`InferError` becomes its gRPC status (with its trailers), cancellation and aborts pass through, and
anything else is logged with the RPC's name and answered INTERNAL for that one call, never a crashed
server. Handlers therefore only raise; none of them calls `context.abort` itself. The REST binding
maps the same `InferError` through `server.errors.HTTP_STATUS`, and `status_of` is what both use for
an exception that is not one.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

import grpc

from server.errors import InferError

log = logging.getLogger("cnnserve.boundary")


def status_of(exc: BaseException, rpc: str) -> InferError:
    """The InferError a failure is answered with; unexpected exceptions are logged and become INTERNAL."""
    if isinstance(exc, InferError):
        return exc
    log.error("%s failed", rpc, exc_info=(type(exc), exc, exc.__traceback__), extra={"rpc": rpc})
    return InferError(grpc.StatusCode.INTERNAL, f"{rpc}: internal error: {type(exc).__name__}: {exc}")


async def _abort(context: grpc.aio.ServicerContext, err: InferError) -> None:
    if err.trailers:
        context.set_trailing_metadata(err.trailers)
    await context.abort(err.code, err.message)


def _guard_unary(fn: Callable, rpc: str) -> Callable:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every failure is answered here
            await _abort(context, status_of(exc, rpc))

    return behaviour


def _guard_streaming(fn: Callable, rpc: str) -> Callable:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, status_of(exc, rpc))

    return behaviour


def guard_handler(handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped by the boundary."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary(handler.unary_unary, rpc), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _guard_streaming(handler.unary_stream, rpc), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _guard_unary(handler.stream_unary, rpc), handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        _guard_streaming(handler.stream_stream, rpc), handler.request_deserializer, handler.response_serializer)


class _HandlerCapture:
    """Stands in for the server so a generated `add_*Servicer_to_server` hands over its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def guard_servicer(server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any,
                   overrides: dict[str, grpc.RpcMethodHandler] | None = None) -> str:
    """Register `servicer` (through its generated `add_to_server`) with every method behind the
    boundary; `overrides` replaces generated handlers (e.g. ModelInfer taking raw bytes). Returns the
    full service name (for reflection and health)."""
    capture = _HandlerCapture()
    add_to_server(servicer, capture)
    handlers = {**capture.handlers, **(overrides or {})}
    guarded = {name: guard_handler(h, f"{capture.service.rsplit('.', 1)[-1]}/{name}")
               for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, guarded),))
    server.add_registered_method_handlers(capture.service, guarded)
    return capture.service
