"""Builds and runs the process: the data plane, its gRPC and REST bindings, health, reflection, metrics.

Every binding works on the one `DataPlane` (server/dataplane/plane.py). Adding one is one file in
server/bindings/ and one line here: in GRPC_BINDINGS a function `(server, plane) -> full service name`
(the name goes to reflection and health), in REST_BINDINGS a function `(plane, body) -> routes`.

Start-up: every listener (gRPC, REST, metrics; each may be switched off) is bound before any model
loads, so a port in use fails in milliseconds; a StartupError releases what was bound and
`python -m server` prints its one line. In poll mode a RepositoryPoller (server/poll.py) follows the disk.

Shutdown (SIGTERM/SIGINT): readiness and health turn NOT_SERVING, new inference requests are refused
with UNAVAILABLE, every accepted request is answered (batchers drain), then the process exits.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import heap, metrics, tracing
from server.access import AccessInterceptor, AccessPolicy
from server.bindings import rest_settings, rest_v2, rest_vision
from server.bindings.grpc_inference import GrpcBinding, add_inference_service
from server.bindings.grpc_vision import add_vision_service
from server.bindings.rest import HttpLimits, RestBinding, RestServer
from server.dataplane.admission import (
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_INFLIGHT_REQUESTS,
    DEFAULT_RETRY_PUSHBACK_MS,
    Admission,
)
from server.dataplane.plane import DataPlane
from server.dataplane.state import ServerState
from server.dataplane.vision import DEFAULT_VISION_THREADS
from server.gpu_metrics import register_gpu_metrics
from server.poll import RepositoryPoller
from server.repository import ModelRepository, RuntimeDefaults
from server.tls import TlsFiles, warn_if_exposed

log = logging.getLogger("cnnserve.app")

GRPC_BINDINGS: list[GrpcBinding] = [add_inference_service, add_vision_service]
REST_BINDINGS: list[RestBinding] = [rest_v2.routes, rest_vision.routes, rest_settings.routes]

# A 32x3x224x224 FP32 batch is 19.3 MB; 64 MiB leaves room for its outputs and larger inputs.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ServerConfig:
    model_repository: Path
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 8002
    allow_metrics: bool = True
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_inflight_requests: int = DEFAULT_MAX_INFLIGHT_REQUESTS  # server/dataplane/admission.py; 0 = no limit
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    retry_pushback_ms: int = DEFAULT_RETRY_PUSHBACK_MS
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = False
    exit_timeout_s: float = 30.0
    strict_readiness: bool = True  # Triton's default: not ready while a model failed to load
    # none: load all at start; explicit: only load_models, then RPCs; poll: all, then follow the disk
    model_control_mode: str = "none"
    repository_poll_secs: float = 15.0
    load_models: list[str] = field(default_factory=list)
    ready_file: Path | None = None  # written (JSON: ports, pid) once serving; lets tests use port 0
    grpc_tls: TlsFiles | None = None  # None: plaintext (warned about beyond loopback)
    grpc_access: AccessPolicy | None = None  # access keys per API group (server/access.py)
    reuse_port: bool = False  # SO_REUSEPORT: set in --workers processes, which share the ports
    allow_grpc: bool = True
    vision_threads: int = DEFAULT_VISION_THREADS  # the vision calls' decode/preprocess pool
    allow_http: bool = True  # the REST bindings (server/bindings/rest*.py)
    http_address: str = "0.0.0.0"
    http_port: int = 8000
    http_tls: TlsFiles | None = None
    http_access: AccessPolicy | None = None
    http_limits: HttpLimits = field(default_factory=HttpLimits)


class StartupError(Exception):
    """Why the server could not start (a port in use, no repository): one line for the operator."""


class InferenceServer:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.state = ServerState()
        self.state.strict_readiness = cfg.strict_readiness
        self.state.admission = Admission(cfg.max_inflight_requests, cfg.max_inflight_bytes, cfg.retry_pushback_ms)
        self.state.model_control_mode = cfg.model_control_mode
        self.repository = ModelRepository(
            cfg.model_repository, RuntimeDefaults(cfg.intra_op_threads, cfg.inter_op_threads, cfg.allow_spinning)
        )
        self.plane = DataPlane(self.repository, self.state, vision_threads=cfg.vision_threads)
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.http: RestServer | None = None
        self.http_port = 0
        self.metrics_port = 0
        self._metrics_http: ThreadingHTTPServer | None = None
        self._poller: RepositoryPoller | None = None
        admission = self.state.admission
        self._idle_release = heap.IdleRelease(lambda: (admission.requests, admission.admitted))
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Bind every listener, then load the models: a port in use fails the start in milliseconds, before
        minutes of model loading, with one StartupError naming the flag at fault."""
        cfg = self.cfg
        if not cfg.model_repository.is_dir():
            raise StartupError(f"--model-repository {cfg.model_repository} is not a directory")
        names = await self._bind_grpc() if cfg.allow_grpc else []
        if cfg.allow_http:
            if not cfg.reuse_port:
                check_port_free(cfg.http_address, cfg.http_port, "HTTP", "--http-port")
            self.http = RestServer(self.plane, REST_BINDINGS, cfg.http_access, cfg.http_limits)
            warn_if_exposed("http", cfg.http_address, cfg.http_tls)
            try:
                self.http_port = await self.http.start(
                    cfg.http_address, cfg.http_port, cfg.http_tls, reuse_port=cfg.reuse_port
                )
            except SystemExit as exc:  # the REST server's own one-line refusal
                raise StartupError(f"{exc} (--http-port)") from None
            if cfg.http_access:
                log.info(
                    "access keys required", extra={"protocol": "http", "restricted": cfg.http_access.restricted_groups}
                )
        if cfg.allow_metrics:
            try:
                self._metrics_http = metrics.serve_metrics(cfg.metrics_port, cfg.metrics_address, metrics.REGISTRY)
            except OSError as exc:
                raise StartupError(
                    f"could not bind metrics to {cfg.metrics_address}:{cfg.metrics_port} "
                    f"(--metrics-port): {exc.strerror or exc}"
                ) from None
            self.metrics_port = self._metrics_http.server_port
            metrics.REGISTRY.register(metrics.TritonCollector(self.repository.all_stats))
            register_gpu_metrics(metrics.REGISTRY)  # per-GPU NVML gauges; a logged no-op without NVML
        if cfg.model_control_mode == "poll":  # its snapshot first: a change made during the load is seen
            self._poller = RepositoryPoller(self.repository, cfg.repository_poll_secs)
        if cfg.model_control_mode == "explicit":
            # Triton's `--load-model=*`: everything on disk, still answering load/unload requests.
            await self.repository.load_all(None if "*" in cfg.load_models else cfg.load_models)
        else:
            await self.repository.load_all()
        if self._poller is not None:
            self._poller.start()
        self._idle_release.start()
        self.state.started = True
        for n in names:
            await self.health.set(n, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        models = {n: s.state for n, s in self.repository.models.items()}
        log.info(
            "server ready",
            extra={
                "grpc_port": self.grpc_port,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "models": models,
            },
        )
        if cfg.ready_file is not None:
            tmp = cfg.ready_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "grpc_port": self.grpc_port,
                        "http_port": self.http_port,
                        "metrics_port": self.metrics_port,
                        "pid": os.getpid(),
                        "models": models,
                    }
                )
            )
            tmp.replace(cfg.ready_file)  # atomic: a reader never sees half a file

    async def _bind_grpc(self) -> list[str]:
        """Build the gRPC server with every binding, bind and start it (live, not ready); the service names."""
        cfg = self.cfg
        opts = [
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            # Workers (server/workers.py) share the port; a lone server must own it.
            ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
        ]
        # The interceptor only when a group is restricted: unrestricted servers pay nothing per call.
        interceptors = [AccessInterceptor(cfg.grpc_access)] if cfg.grpc_access else None
        server = grpc.aio.server(options=opts, interceptors=interceptors)
        self.grpc_server = server  # from here on, stop() (or a failed start) stops it
        names = []
        for add in GRPC_BINDINGS:
            name = add(server, self.plane)
            if inspect.isawaitable(name):
                name = await name
            names.append(name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection(names + [reflection.SERVICE_NAME], server)
        address = f"{cfg.grpc_address}:{cfg.grpc_port}"
        if not cfg.reuse_port:
            # gRPC's own refusal is a C-core log line plus a RuntimeError that names no cause: probe first.
            check_port_free(cfg.grpc_address, cfg.grpc_port, "gRPC", "--grpc-port")
        try:
            if cfg.grpc_tls is not None:
                self.grpc_port = server.add_secure_port(address, cfg.grpc_tls.grpc_credentials())
            else:
                warn_if_exposed("grpc", cfg.grpc_address, None)
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError:
            self.grpc_port = 0
        if self.grpc_port == 0:
            raise StartupError(f"could not bind gRPC to {address} (--grpc-address / --grpc-port)")
        if cfg.grpc_access:
            log.info(
                "access keys required", extra={"protocol": "grpc", "restricted": cfg.grpc_access.restricted_groups}
            )
        for n in names:
            await self.health.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()  # live (ServerLive) while models load; ready only after
        return names

    async def abandon_start(self) -> None:
        """Release what a failed or interrupted start() bound, so the process exits without gRPC's
        'Event loop is closed' noise from a server never stopped."""
        await self._idle_release.stop()
        if self._poller is not None:
            await self._poller.stop()
        if self.http is not None:
            await self.http.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(None)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self.plane.close()
        await self.repository.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        log.info(
            "shutting down: refusing new requests, draining accepted ones", extra={"inflight": self.state.inflight}
        )
        self.state.shutting_down = True
        await self.health.enter_graceful_shutdown()
        await self._idle_release.stop()
        if self._poller is not None:
            await self._poller.stop()
        # Drain first with the server still up: accepted inference RPCs finish (the batchers keep
        # executing), new ones are refused with UNAVAILABLE by the servicers, and probes can still see
        # ServerReady false / health NOT_SERVING. Then grpc stops, giving any other RPC the time left.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.exit_timeout_s
        while self.state.inflight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.http is not None:
            await self.http.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(max(0.5, deadline - loop.time()))
        self.plane.close()  # the vision pool: every binding has stopped, nothing can submit to it
        await self.repository.close()
        self.state.shared_memory.close()  # regions are unmapped; the clients own the objects
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        tracing.TRACER.close()  # trace files written, spans exported
        log.info("server stopped")


def check_port_free(address: str, port: int, what: str, flag: str) -> None:
    """StartupError unless `port` (not 0) can be bound on `address` now; bound and released at once."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(address.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"could not bind {what} to {address}:{port} ({flag}): {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise StartupError(f"could not bind {what} to {address}:{port} ({flag}): {exc.strerror or exc}") from None


async def serve(cfg: ServerConfig) -> None:
    """Run the server until SIGTERM/SIGINT; a failed start is released and raised as StartupError."""
    srv = InferenceServer(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.request_stop)
    start = asyncio.create_task(srv.start())
    stop_wait = asyncio.create_task(srv.wait())
    await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if start.done() and (failure := start.exception()) is not None:
        stop_wait.cancel()
        await srv.abandon_start()
        raise failure
    if start.done():
        await stop_wait
    else:
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
    await srv.stop()
