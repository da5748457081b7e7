"""What every client shares: owning (or borrowing) a gRPC channel, and turning RPC errors into one type.

Blocking and asyncio flavours; a client class names its stub and adds one method per RPC.
"""
from __future__ import annotations

from typing import Any, Callable, Self

import grpc

DEFAULT_URL = "127.0.0.1:8001"
# Large requests (a 32-image FP32 batch is ~19 MB) must not trip gRPC's 4 MB default.
_MAX_MESSAGE = 2**31 - 1
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
)


class InferenceServerError(Exception):
    """A failed call: `code` is the gRPC status, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"[{code.name}] {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> "InferenceServerError":
        return cls(exc.code(), exc.details() or "")


class BlockingClient:
    """A blocking channel, closed with the client only if the client opened it."""

    stub_type: Callable[[grpc.Channel], Any]

    def __init__(self, url: str = DEFAULT_URL, channel: grpc.Channel | None = None) -> None:
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
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

    def __init__(self, url: str = DEFAULT_URL, channel: grpc.aio.Channel | None = None) -> None:
        self._own_channel = channel is None
        self.channel = channel or grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)
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
