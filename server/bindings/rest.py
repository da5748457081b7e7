"""The REST server the REST bindings share (aiohttp, on the event loop grpc.aio runs on).

A REST binding is a function `routes(plane, body) -> [RestRoute, ...]` (server/bindings/rest_v2.py:
KServe v2; rest_vision.py: the vision API): its handlers translate HTTP into data-plane calls and the
results into HTTP. Registering one is one line in server.app.REST_BINDINGS. What every route gets from
here, once: the access-key guard (before the body is read), the body limits (`RestBody`), and the
error answer: any failure is an `InferError` (or becomes INTERNAL through `status_of`) answered with
`InferError.http_status` and the v2 error body `{"error": "..."}`. What a body may be (its
Content-Encoding inflated off the loop under the size cap, standard JSON only, tensor data of its
declared datatype and range) is server/bindings/http_body.py.

Limits: bodies over --http-max-input-size are refused (413) from their Content-Length before they are
read, or as soon as they pass it; a body must arrive within --http-body-timeout-secs (408, connection
closed), so a client that trickles its bytes holds a request slot for that long at most; a connection
that never completes its request line and headers is closed after --http-idle-timeout-secs; header lines
and fields are capped at --http-max-header-bytes (aiohttp answers 400).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from server.access import AccessPolicy
from server.bindings.http_body import decode_body, loads, too_large, too_slow
from server.bindings.unsupported_apis import unsupported
from server.dataplane.plane import DataPlane
from server.errors import InferError, invalid, status_of
from server.tls import TlsFiles

DEFAULT_MAX_INPUT_SIZE = 64 * 1024 * 1024  # Triton's --http-max-input-size default
DEFAULT_BODY_TIMEOUT_S = 30.0
# Above the idle timeouts of the load balancers in front (AWS ALB 60 s; nginx's upstream keep-alive 60 s):
# a server that closes an idle keep-alive connection first races the proxy's next request on it (502s).
DEFAULT_IDLE_TIMEOUT_S = 75.0
DEFAULT_MAX_HEADER_BYTES = 8190  # aiohttp's own default for a request line and for one header field
MAX_HEADERS = 128

# JSON above this is parsed in a worker thread: a 20 MB tensor written as JSON takes seconds to parse,
# which on the event loop would stall every other request and health probe.
_OFFLOAD_JSON_BYTES = 1 << 20
T = TypeVar("T")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class RestRoute:
    method: str
    path: str
    handler: Handler
    group: str  # the access-key API group (server/access.py)


@dataclass(frozen=True)
class HttpLimits:
    max_input_size: int = DEFAULT_MAX_INPUT_SIZE
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES


def field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """`obj[key]` checked to be of `kind` (INVALID_ARGUMENT naming it otherwise); `default` when absent."""
    if key not in obj:
        if default is ...:
            raise invalid(f"{where}: '{key}' is required")
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise invalid(f"{where}: '{key}' must be {names}, got {type(value).__name__}")
    return value


class RestBody:
    """Reading request bodies under the limits: the size cap and the body timeout."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits

    async def read(self, request: web.Request, read: Callable[[], Awaitable[T]]) -> T:
        """`read()` of the body under the size cap and the body timeout."""
        limit = self.limits.max_input_size
        if request.content_length is not None and request.content_length > limit:
            raise too_large(
                f"request body of {request.content_length} bytes exceeds the limit of "
                f"{limit} bytes (--http-max-input-size)"
            )
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                return await read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(f"request body exceeds the limit of {limit} bytes (--http-max-input-size)") from None
        except TimeoutError:
            raise too_slow(
                f"request body not received within {self.limits.body_timeout_s:g} s (--http-body-timeout-secs)"
            ) from None

    async def content(self, request: web.Request) -> bytes:
        """The body as sent before its Content-Encoding (inflated off the loop under the size cap)."""
        return await decode_body(request, await self.read(request, request.read), self.limits.max_input_size)

    async def json(self, data: bytes | memoryview, what: str) -> Any:
        try:
            if len(data) > _OFFLOAD_JSON_BYTES:
                return await asyncio.to_thread(loads, bytes(data))
            return loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid(f"{what} is not valid JSON: {exc}") from None
        except RecursionError:
            raise invalid(f"{what} nests too deeply") from None

    async def json_object(self, request: web.Request, what: str) -> dict[str, Any]:
        """An optional JSON object body (repository calls): {} when empty."""
        body = await self.content(request)
        if not body.strip():
            return {}
        doc = await self.json(body, what)
        if not isinstance(doc, dict):
            raise invalid(f"{what} must be a JSON object, got {type(doc).__name__}")
        return doc


RestBinding = Callable[[DataPlane, RestBody], list[RestRoute]]


def error_response(err: InferError) -> web.Response:
    response = web.json_response({"error": err.message}, status=err.http_status, headers=dict(err.trailers) or None)
    if err.http_status in (408, 413):
        response.force_close()  # the rest of the body is never read: the connection cannot go on
    return response


class RestServer:
    def __init__(
        self,
        plane: DataPlane,
        bindings: list[RestBinding],
        policy: AccessPolicy | None = None,
        limits: HttpLimits = HttpLimits(),
    ) -> None:
        self.plane = plane
        self.bindings = bindings
        self.policy = policy
        self.limits = limits
        self.port = 0
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_input_size, middlewares=[self._errors])
        body = RestBody(self.limits)
        for binding in self.bindings:
            for route in binding(self.plane, body):
                app.router.add_route(route.method, route.path, self._guarded(route.handler, route.group))
        return app

    def _guarded(self, handler: Handler, group: str) -> Handler:
        policy = self.policy
        if not policy:
            return handler

        async def guarded(request: web.Request) -> web.StreamResponse:
            # Before the body is read: a refused request costs no parsing.
            denial = policy.check(group, lambda name: request.headers.getall(name, []))
            if denial is not None:
                return error_response(denial.error)
            return await handler(request)

        return guarded

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:  # no route (404), wrong method (405), ...: the v2 error body too
            if exc.status < 400:
                raise
            if exc.status == 404 and (err := unsupported(request.path)) is not None:  # Triton's API, not ours
                return error_response(err)
            return web.json_response(
                {"error": exc.reason},
                status=exc.status,
                headers={k: v for k, v in exc.headers.items() if k == "Allow"} or None,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return error_response(status_of(exc, f"HTTP {request.method} {request.path}"))

    # -- life cycle ------------------------------------------------------------------------------------------
    async def start(self, address: str, port: int, tls: TlsFiles | None, reuse_port: bool = False) -> int:
        runner = web.AppRunner(
            self.app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,  # stop() runs after the drain: no inference is left in flight
            auto_decompress=False,  # bodies are inflated by http_body.py: bounded, off the loop
            keepalive_timeout=self.limits.idle_timeout_s,
            # After an answer that left the body unread (413, 408, a refused key), aiohttp drains the rest
            # so the client reads the answer rather than a reset; 10 s by default, 1 s here.
            lingering_time=1.0,
            # aiohttp pauses the socket each time 2x this much body is buffered unread; 64 KiB (its
            # default) means a dozen pause/resume cycles and loop wake-ups per 600 KB tensor.
            read_bufsize=1 << 20,
            max_line_size=self.limits.max_header_bytes,
            max_field_size=self.limits.max_header_bytes,
            max_headers=MAX_HEADERS,
        )
        await runner.setup()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = socket.create_server(
                (address.strip("[]"), port), family=family, backlog=1024, reuse_port=reuse_port
            )  # --workers share the port
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
