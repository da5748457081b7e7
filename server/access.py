"""Access keys per API group (Triton's `--grpc-restricted-protocol` / `--http-restricted-api`).

    --grpc-restricted-protocol=<group>[,<group>...]:<header>=<value>

A request to a restricted group must carry `<header>` with `<value>`; other groups stay open. The value
may name where the key is instead of being it, so it need not appear in `ps` or a manifest:
`@/path/to/file` (the file's content, trailing newline dropped) or `env:VARIABLE`. Missing header:
UNAUTHENTICATED / HTTP 401; wrong value: PERMISSION_DENIED / HTTP 403 (`Denial.error`, an InferError
mapped like every other failure). Values are compared in constant
time and every refusal is counted in `cnnserve_access_denied_total{protocol,group,reason}`.

`AccessPolicy` knows groups and headers only; each binding maps its own requests to a group and hands
over a header lookup: `AccessInterceptor` does so for gRPC, the REST binding for its routes. Over gRPC
the header may also be sent as `triton-grpc-protocol-<header>`, the name Triton's gRPC server reads, so
clients written for Triton work unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import grpc

from cnncore.secrets import resolve_secret
from server import metrics
from server.errors import InferError

log = logging.getLogger("cnnserve.access")

GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)

# Triton's grouping of the inference service's RPCs, including the ones this server answers
# UNIMPLEMENTED (shared memory, trace, log settings): restricting them still refuses before that.
_INFERENCE_SERVICE = "inference.GRPCInferenceService"
_INFERENCE_RPC_GROUPS = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}
# Whole services: the vision API runs inference; the standard health service is health; reflection
# describes the API, i.e. metadata.
_SERVICE_GROUPS = {
    "cnnserve.vision.VisionService": "inference",
    "grpc.health.v1.Health": "health",
    "grpc.reflection.v1alpha.ServerReflection": "metadata",
    "grpc.reflection.v1.ServerReflection": "metadata",
}
TRITON_GRPC_HEADER_PREFIX = "triton-grpc-protocol-"

_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class AccessConfigError(ValueError):
    """A restriction flag that cannot be used as given (the message names the flag and the fix)."""


def grpc_group(method: str) -> str | None:
    """The API group of a gRPC method path (`/package.Service/Method`); None for a method no group
    names (such a call is answered UNIMPLEMENTED by grpc: nothing is served without a group)."""
    service, _, rpc = method.lstrip("/").partition("/")
    if service == _INFERENCE_SERVICE:
        return _INFERENCE_RPC_GROUPS.get(rpc)
    return _SERVICE_GROUPS.get(service)


@dataclass(frozen=True)
class Restriction:
    groups: frozenset[str]
    header: str  # lower case: gRPC metadata keys are, HTTP header names compare case-insensitively
    value: str = field(repr=False)  # the key: never in a repr, a log line or an error message

    @cached_property
    def digest(self) -> bytes:
        """The key's SHA-256, what each request's value is compared with (computed once, not per call)."""
        return hashlib.sha256(self.value.encode()).digest()

    @classmethod
    def parse(cls, spec: str, flag: str) -> Restriction:
        """`<group>[,<group>...]:<header>=<value>` -> Restriction; AccessConfigError names what is wrong."""
        groups_part, sep, kv = spec.partition(":")
        header, eq, raw = kv.partition("=")
        if not sep or not eq:
            raise AccessConfigError(
                f"{flag}: expected <group>[,<group>...]:<header>=<value>, got {spec.split('=', 1)[0]!r}=..."
            )
        groups = [g.strip() for g in groups_part.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if not groups or unknown:
            raise AccessConfigError(
                f"{flag}: unknown API group(s) {unknown or groups_part!r}; groups are {', '.join(GROUPS)}"
            )
        header = header.strip().lower()
        if not _HEADER_NAME.match(header) or header.endswith("-bin") or header.startswith("grpc-"):
            raise AccessConfigError(
                f"{flag}: header {header!r} is not usable: lower-case letters, digits, "
                "'-', '_' and '.', not starting with 'grpc-' nor ending in '-bin'"
            )
        try:
            value = resolve_secret(raw, flag)
        except ValueError as exc:  # an empty key would let every request in
            raise AccessConfigError(str(exc)) from None
        return cls(frozenset(groups), header, value)


@dataclass(frozen=True)
class Denial:
    protocol: str
    group: str
    header: str
    reason: Literal["missing", "wrong"]

    @property
    def message(self) -> str:
        # Triton's wording first, so tooling that matches on it keeps working.
        why = "none was sent" if self.reason == "missing" else "the value sent does not match"
        return f"This API is restricted, expecting header '{self.header}' ('{self.group}' group): {why}"

    @property
    def error(self) -> InferError:
        """The refusal every binding answers: its gRPC code, and through server.errors' one table its
        HTTP status (UNAUTHENTICATED 401, PERMISSION_DENIED 403)."""
        code = grpc.StatusCode.UNAUTHENTICATED if self.reason == "missing" else grpc.StatusCode.PERMISSION_DENIED
        return InferError(code, self.message)


# header name (lower case) -> the values the request sent (gRPC's binary `-bin` metadata arrives as bytes)
HeaderLookup = Callable[[str], Sequence[str | bytes]]


class AccessPolicy:
    """Which groups need which header, for one protocol ("grpc" or "http")."""

    def __init__(self, restrictions: Iterable[Restriction], protocol: str, flag: str) -> None:
        self.protocol = protocol
        self._by_group: dict[str, Restriction] = {}
        for r in restrictions:
            for g in sorted(r.groups):
                if g in self._by_group:
                    raise AccessConfigError(f"{flag}: group '{g}' is restricted twice; each group takes one key")
                self._by_group[g] = r

    @classmethod
    def from_flags(cls, specs: Sequence[str], protocol: str, flag: str) -> AccessPolicy:
        return cls([Restriction.parse(s, flag) for s in specs], protocol, flag)

    def __bool__(self) -> bool:
        return bool(self._by_group)

    @property
    def restricted_groups(self) -> dict[str, str]:
        """group -> header name (for the start-up log; never the key)."""
        return {g: r.header for g, r in sorted(self._by_group.items())}

    def _names(self, header: str) -> tuple[str, ...]:
        return (header, TRITON_GRPC_HEADER_PREFIX + header) if self.protocol == "grpc" else (header,)

    def check(self, group: str | None, lookup: HeaderLookup) -> Denial | None:
        """None when the request may proceed; otherwise the Denial (already counted)."""
        r = self._by_group.get(group) if group is not None else None
        if r is None or group is None:
            return None
        sent = [v for name in self._names(r.header) for v in lookup(name)]
        # Digests compared, not the values: compare_digest is constant-time only for equal lengths, and
        # the key's length is no one's business. Every sent value is compared (no early exit).
        expected = r.digest
        ok = False
        for v in sent:
            ok |= hmac.compare_digest(hashlib.sha256(v.encode() if isinstance(v, str) else bytes(v)).digest(), expected)
        if ok:
            return None
        denial = Denial(self.protocol, group, r.header, "missing" if not sent else "wrong")
        metrics.ACCESS_DENIED.labels(self.protocol, group, denial.reason).inc()
        log.info("request refused", extra={"protocol": self.protocol, "group": group, "reason": denial.reason})
        return denial


def _refusal(handler: grpc.RpcMethodHandler | None, denial: Denial) -> grpc.RpcMethodHandler:
    """A handler of the same RPC shape as `handler` that answers `denial` without reading the request
    (no deserializer: a refused ModelInfer is never parsed)."""

    err = denial.error

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(err.code, err.message)

    serializer = handler.response_serializer if handler is not None else None
    req_stream = handler is not None and handler.request_streaming
    resp_stream = handler is not None and handler.response_streaming
    if req_stream and resp_stream:
        return grpc.stream_stream_rpc_method_handler(refuse, None, serializer)
    if req_stream:
        return grpc.stream_unary_rpc_method_handler(refuse, None, serializer)
    if resp_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, None, serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, None, serializer)


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Applies an AccessPolicy to every gRPC call before its handler runs."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        metadata = details.invocation_metadata or ()

        def lookup(name: str) -> list[str | bytes]:
            return [v for k, v in metadata if k == name]

        denial = self.policy.check(grpc_group(details.method), lookup)
        handler = await continuation(details)
        return handler if denial is None else _refusal(handler, denial)
