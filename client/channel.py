"""What every client shares: owning (or borrowing) a gRPC channel, and turning RPC errors into one type.

Blocking and asyncio flavours; a client class names its stub and adds one method per RPC. A channel the
client opens itself may use TLS (`tls=ClientTLS(...)`, tritonclient's option names) and send `headers`
(e.g. the access key of a restricted API group) on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc

DEFAULT_URL = "127.0.0.1:8001"
# Large requests (a 32-image FP32 batch is ~19 MB) must not trip gRPC's 4 MB default.
_MAX_MESSAGE = 2**31 - 1
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
)


@dataclass(frozen=True)
class ClientTLS:
    """TLS for a channel: `root_certificates` (PEM file of the CA that signed the server; None: the
    system's), and for mutual TLS the client's `certificate_chain` and `private_key` (PEM files).
    `target_name` overrides the name checked against the server certificate (when the URL's host is
    not in it)."""

    root_certificates: Path | None = None
    private_key: Path | None = None
    certificate_chain: Path | None = None
    target_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("mutual TLS needs both the client certificate chain and its private key")

        def read(p: Path | None) -> bytes | None:
            return None if p is None else Path(p).read_bytes()

        return grpc.ssl_channel_credentials(
            read(self.root_certificates), read(self.private_key), read(self.certificate_chain)
        )

    def options(self) -> tuple[tuple[str, Any], ...]:
        return (("grpc.ssl_target_name_override", self.target_name),) if self.target_name else ()


def _metadata(headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    # gRPC metadata keys are lower case; sending "X-Key" would fail every call, not just this header.
    return tuple((k.lower(), v) for k, v in (headers or {}).items())


class _AddsMetadata:
    """What both header interceptors do to a call: append the fixed metadata to its own."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)


class _HeaderInterceptor(
    _AddsMetadata,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata to every call of a blocking channel, whatever the stub."""

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _AsyncHeaderInterceptor(
    _AddsMetadata,
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """The grpc.aio twin of _HeaderInterceptor."""

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def open_channel(
    url: str = DEFAULT_URL, tls: ClientTLS | None = None, headers: Mapping[str, str] | None = None
) -> grpc.Channel:
    """A blocking channel to `url`, over TLS when `tls` is given, sending `headers` on every call."""
    if tls is None:
        channel = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(url, tls.credentials(), options=CHANNEL_OPTIONS + tls.options())
    metadata = _metadata(headers)
    return grpc.intercept_channel(channel, _HeaderInterceptor(metadata)) if metadata else channel


def open_aio_channel(
    url: str = DEFAULT_URL, tls: ClientTLS | None = None, headers: Mapping[str, str] | None = None
) -> grpc.aio.Channel:
    """The grpc.aio twin of open_channel."""
    metadata = _metadata(headers)
    interceptors = [_AsyncHeaderInterceptor(metadata)] if metadata else None
    if tls is None:
        return grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(
        url, tls.credentials(), options=CHANNEL_OPTIONS + tls.options(), interceptors=interceptors
    )


class InferenceServerError(Exception):
    """A failed call: `code` is the gRPC status, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"[{code.name}] {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> InferenceServerError:
        return cls(exc.code(), exc.details() or "")


class BlockingClient:
    """A blocking channel, closed with the client only if the client opened it."""

    stub_type: Callable[[grpc.Channel], Any]

    def __init__(
        self,
        url: str = DEFAULT_URL,
        channel: grpc.Channel | None = None,
        *,
        tls: ClientTLS | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._own_channel = channel is None
        self.channel = channel or open_channel(url, tls, headers)
        self._stub = self.stub_type(self.channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def _call(self, rpc: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, rpc)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc(exc) from None


class AsyncClient:
    """The asyncio twin of BlockingClient, over grpc.aio."""

    stub_type: Callable[[grpc.aio.Channel], Any]

    def __init__(
        self,
        url: str = DEFAULT_URL,
        channel: grpc.aio.Channel | None = None,
        *,
        tls: ClientTLS | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._own_channel = channel is None
        self.channel = channel or open_aio_channel(url, tls, headers)
        self._stub = self.stub_type(self.channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    async def _call(self, rpc: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self._stub, rpc)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc(exc) from None
