"""`python -m server --model-repository DIR`: the inference server CLI (Triton's flag names)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from pathlib import Path

from server.access import AccessConfigError, AccessPolicy
from server.app import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig, StartupError, serve
from server.bindings.rest import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_INPUT_SIZE,
    HttpLimits,
)
from server.dataplane.admission import (
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_INFLIGHT_REQUESTS,
    DEFAULT_RETRY_PUSHBACK_MS,
)
from server.dataplane.vision import DEFAULT_VISION_THREADS
from server.latency_summary import MetricsConfigError
from server.latency_summary import configure as configure_summaries
from server.logs import FORMATS, setup_logging
from server.tls import TlsConfigError, TlsFiles
from server.tracing import TRACER, TraceConfigError
from server.workers import DEFAULT_CRASH_LIMIT, DEFAULT_CRASH_WINDOW_S, supervise, take_cpu_share, worker_role


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _add_tls_flags(p: argparse.ArgumentParser, proto: str, what: str) -> None:
    """Triton's TLS flag set for one listener: --<proto>-use-ssl[-mutual], -server-cert/-key, -root-cert."""
    p.add_argument(
        f"--{proto}-use-ssl",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help=f"serve {what} (needs --{proto}-server-cert and --{proto}-server-key)",
    )
    p.add_argument(
        f"--{proto}-use-ssl-mutual",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help=f"mutual TLS: also require a client certificate signed by --{proto}-root-cert",
    )
    p.add_argument(f"--{proto}-server-cert", type=Path, default=None, help="PEM certificate (chain) of the server")
    p.add_argument(f"--{proto}-server-key", type=Path, default=None, help=f"PEM private key of --{proto}-server-cert")
    p.add_argument(
        f"--{proto}-root-cert",
        type=Path,
        default=None,
        help="PEM CA certificate(s) that client certificates must chain to (mutual TLS)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="cnnserve: KServe v2 / Open Inference Protocol server (gRPC and REST) with dynamic batching "
        "(ONNX Runtime backend) and Prometheus metrics.",
    )
    p.add_argument(
        "--model-repository",
        "--model-store",
        dest="model_repository",
        type=Path,
        required=True,
        help="model repository directory (<model>/config.pbtxt, <model>/<version>/model.onnx)",
    )
    p.add_argument("--allow-grpc", type=_bool, default=True, help="serve the KServe v2 gRPC API (default true)")
    p.add_argument("--grpc-address", default="0.0.0.0", help="gRPC bind address (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 = pick a free one)")
    _add_tls_flags(p, "grpc", "gRPC over TLS")
    p.add_argument(
        "--grpc-restricted-protocol",
        action="append",
        default=[],
        metavar="GROUPS:HEADER=VALUE",
        help="require HEADER=VALUE on the comma-separated API groups (health, metadata, inference, "
        "shared-memory, model-config, model-repository, statistics, trace, logging); VALUE may "
        "be @FILE or env:VARIABLE to keep the key off the command line; repeatable",
    )
    p.add_argument("--allow-http", type=_bool, default=True, help="serve the KServe v2 REST API (default true)")
    p.add_argument("--http-address", default="0.0.0.0", help="HTTP bind address (default 0.0.0.0)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 = pick a free one)")
    _add_tls_flags(p, "http", "HTTPS")
    p.add_argument(
        "--http-restricted-api",
        action="append",
        default=[],
        metavar="GROUPS:HEADER=VALUE",
        help="as --grpc-restricted-protocol, for the HTTP API; repeatable",
    )
    p.add_argument(
        "--http-max-input-size",
        type=int,
        default=DEFAULT_MAX_INPUT_SIZE,
        help=f"largest HTTP request body in bytes; larger ones get 413 (default {DEFAULT_MAX_INPUT_SIZE})",
    )
    p.add_argument(
        "--http-body-timeout-secs",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="a request body must arrive within this (408 and the connection closed otherwise; "
        f"default {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--http-idle-timeout-secs",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help="close a connection idle this long, or one whose request line and headers are not "
        f"complete by then; keep it above a load balancer's idle timeout (default "
        f"{DEFAULT_IDLE_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--http-max-header-bytes",
        type=int,
        default=DEFAULT_MAX_HEADER_BYTES,
        help=f"longest request line and header field (default {DEFAULT_MAX_HEADER_BYTES}; 400 beyond)",
    )
    p.add_argument("--allow-metrics", type=_bool, default=True, help="serve Prometheus metrics (default true)")
    p.add_argument("--metrics-address", default="0.0.0.0", help="metrics HTTP bind address (default 0.0.0.0)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics HTTP port (default 8002; 0 = free one)")
    p.add_argument(
        "--grpc-max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help=f"largest gRPC message received or sent (default {DEFAULT_MAX_MESSAGE_BYTES})",
    )
    p.add_argument(
        "--max-inflight-requests",
        type=int,
        default=DEFAULT_MAX_INFLIGHT_REQUESTS,
        help="inference requests (both APIs) held at once; beyond it RESOURCE_EXHAUSTED with a "
        f"grpc-retry-pushback-ms trailer (default {DEFAULT_MAX_INFLIGHT_REQUESTS}; 0 = no limit)",
    )
    p.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=DEFAULT_MAX_INFLIGHT_BYTES,
        help="request bytes held at once, the same way (default "
        f"{DEFAULT_MAX_INFLIGHT_BYTES // (1 << 20)} MiB; 0 = no limit)",
    )
    p.add_argument(
        "--retry-pushback-ms",
        type=int,
        default=DEFAULT_RETRY_PUSHBACK_MS,
        help=f"how long a refused client is told to wait (default {DEFAULT_RETRY_PUSHBACK_MS})",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads per model instance (0 = library default; "
        "config parameter intra_op_thread_count overrides)",
    )
    p.add_argument("--inter-op-threads", type=int, default=0, help="ONNX Runtime inter-op threads (0 = default)")
    p.add_argument(
        "--ort-allow-spinning",
        type=_bool,
        default=False,
        help="let ONNX Runtime's intra-op threads spin between runs (default false: spinning steals "
        "the cores the event loop needs; config parameter intra_op_allow_spinning overrides)",
    )
    p.add_argument(
        "--vision-threads",
        type=int,
        default=DEFAULT_VISION_THREADS,
        help="threads that decode, preprocess and postprocess the vision API's pictures, one pool "
        f"for gRPC and REST (default min(4, cores) = {DEFAULT_VISION_THREADS})",
    )
    p.add_argument(
        "--model-control-mode",
        choices=["none", "explicit", "poll"],
        default="none",
        help="none: load every model at start, refuse load/unload requests; explicit: load only "
        "--load-model, then on request; poll: load every model, then load, reload and unload "
        "as model directories appear, change and disappear (checked every "
        "--repository-poll-secs)",
    )
    p.add_argument(
        "--repository-poll-secs",
        type=float,
        default=15.0,
        help="poll mode: seconds between two looks at the repository (default 15)",
    )
    p.add_argument(
        "--load-model",
        action="append",
        default=[],
        help="model to load at start (explicit mode; '*': every model in the repository)",
    )
    p.add_argument(
        "--strict-readiness",
        type=_bool,
        default=True,
        help="server ready only when every model loaded is ready (default true, as Triton; false: "
        "ready once started, whatever failed to load)",
    )
    p.add_argument(
        "--exit-timeout-secs",
        type=float,
        default=30.0,
        help="on SIGTERM, how long accepted requests may take to finish (default 30)",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="debug = --log-verbose 1; warning / error turn the lower severities off (default info)",
    )
    p.add_argument(
        "--log-format",
        choices=list(FORMATS),
        default="json",
        help="json (one object a line), text, or Triton's default / ISO8601 (default json); "
        "changeable at run time, as the levels are, through /v2/logging and LogSettings",
    )
    p.add_argument(
        "--log-verbose",
        type=int,
        default=0,
        metavar="N",
        help="verbose messages of level <= N (0: none; 1: one line per inference request)",
    )
    p.add_argument("--log-info", type=_bool, default=None, help="log INFO messages (default true)")
    p.add_argument("--log-warning", type=_bool, default=None, help="log WARNING messages (default true)")
    p.add_argument("--log-error", type=_bool, default=None, help="log ERROR messages (default true)")
    p.add_argument("--log-file", default="", help="append the log to this file instead of stderr")
    p.add_argument(
        "--metrics-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Triton's: summary_latencies=true adds nv_inference_*_summary_us quantile summaries; "
        "summary_quantiles=0.5:0.05,0.99:0.001 sets their quantiles; repeatable",
    )
    p.add_argument(
        "--trace-config",
        action="append",
        default=[],
        metavar="[MODE,]KEY=VALUE",
        help="Triton's: level=TIMESTAMPS, rate=N, count=N, file=PATH, log-frequency=N, "
        "mode=triton|opentelemetry, opentelemetry,url=http://HOST:4318/v1/traces, "
        "opentelemetry,resource=KEY=VALUE; repeatable (see /v2/trace/setting)",
    )
    p.add_argument(
        "--backend-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE before loading models, so backends it registers "
        "(server.backends.base.register_backend) can serve them; repeatable",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the ports (SO_REUSEPORT), each with its share of the CPUs; "
        "metrics merged on --metrics-port, SIGTERM drains them all (default 1)",
    )
    p.add_argument(
        "--worker-crash-limit",
        type=int,
        default=DEFAULT_CRASH_LIMIT,
        help="with --workers > 1, a worker that exits is started again; this many exits within "
        f"--worker-crash-window-secs stop the server (exit status 1; default {DEFAULT_CRASH_LIMIT})",
    )
    p.add_argument(
        "--worker-crash-window-secs",
        type=float,
        default=DEFAULT_CRASH_WINDOW_S,
        help=f"the window of --worker-crash-limit (default {DEFAULT_CRASH_WINDOW_S:g})",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write JSON {grpc_port, metrics_port, pid} here once serving (for supervisors, tests)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.log_verbose < 0:
        raise SystemExit(f"python -m server: error: --log-verbose must be >= 0, got {a.log_verbose}")
    setup_logging(
        a.log_level,
        a.log_format,
        verbose_level=a.log_verbose,
        log_info=a.log_info,
        log_warnings=a.log_warning,
        log_errors=a.log_error,
        log_file=a.log_file,
    )
    try:
        configure_summaries(a.metrics_config)
        TRACER.configure(a.trace_config, export=a.workers == 1)  # a supervisor serves no request
    except (MetricsConfigError, TraceConfigError) as exc:
        raise SystemExit(f"python -m server: error: {exc}") from None
    if a.workers < 1:
        raise SystemExit(f"python -m server: error: --workers must be at least 1, got {a.workers}")
    if a.vision_threads < 1:
        raise SystemExit(f"python -m server: error: --vision-threads must be at least 1, got {a.vision_threads}")
    for flag in ("max_inflight_requests", "max_inflight_bytes", "retry_pushback_ms"):
        if getattr(a, flag) < 0:  # Admission would refuse it with a traceback
            raise SystemExit(
                f"python -m server: error: --{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}"
            )
    if a.worker_crash_limit < 1 or not a.worker_crash_window_secs > 0:
        raise SystemExit(
            "python -m server: error: --worker-crash-limit must be >= 1 and --worker-crash-window-secs > 0"
        )
    if not a.model_repository.is_dir():
        raise SystemExit(f"python -m server: error: --model-repository {a.model_repository} is not a directory")
    if a.repository_poll_secs <= 0:
        raise SystemExit(f"python -m server: error: --repository-poll-secs must be > 0, got {a.repository_poll_secs:g}")
    if not a.allow_grpc and not a.allow_http:
        raise SystemExit("python -m server: error: --allow-grpc false and --allow-http false leave nothing to serve")
    if a.workers > 1 and not a.allow_grpc:
        raise SystemExit("python -m server: error: --workers > 1 needs --allow-grpc true")
    if a.workers > 1 and a.model_control_mode == "explicit":
        # A load or unload request reaches the one worker its connection landed on.
        raise SystemExit(
            "python -m server: error: --workers > 1 needs --model-control-mode none "
            "(each worker loads the whole repository at start)"
        )
    if a.workers > 1:
        raise SystemExit(
            supervise(
                sys.argv[1:] if argv is None else argv,
                workers=a.workers,
                grpc_address=a.grpc_address,
                grpc_port=a.grpc_port,
                http_address=a.http_address if a.allow_http else None,
                http_port=a.http_port,
                metrics_address=a.metrics_address,
                metrics_port=a.metrics_port,
                allow_metrics=a.allow_metrics,
                ready_file=a.ready_file,
                exit_timeout_s=a.exit_timeout_secs,
                crash_limit=a.worker_crash_limit,
                crash_window_s=a.worker_crash_window_secs,
            )
        )
    role = worker_role()
    if role is not None:  # a supervised worker: its CPUs, and ORT's threads sized to them unless set
        share = take_cpu_share(role)
        a.intra_op_threads = a.intra_op_threads or share
    for module in a.backend_module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SystemExit(f"--backend-module {module}: cannot import it: {exc}") from None
    try:
        grpc_tls = TlsFiles.from_flags(
            "grpc", a.grpc_use_ssl, a.grpc_use_ssl_mutual, a.grpc_server_cert, a.grpc_server_key, a.grpc_root_cert
        )
        grpc_access = AccessPolicy.from_flags(a.grpc_restricted_protocol, "grpc", "--grpc-restricted-protocol")
        http_tls = TlsFiles.from_flags(
            "http", a.http_use_ssl, a.http_use_ssl_mutual, a.http_server_cert, a.http_server_key, a.http_root_cert
        )
        http_access = AccessPolicy.from_flags(a.http_restricted_api, "http", "--http-restricted-api")
    except (TlsConfigError, AccessConfigError) as exc:
        raise SystemExit(f"python -m server: error: {exc}") from None
    cfg = ServerConfig(
        model_repository=a.model_repository,
        grpc_address=a.grpc_address,
        grpc_port=a.grpc_port,
        metrics_address=a.metrics_address,
        metrics_port=a.metrics_port,
        allow_metrics=a.allow_metrics,
        max_message_bytes=a.grpc_max_message_bytes,
        intra_op_threads=a.intra_op_threads,
        max_inflight_requests=a.max_inflight_requests,
        max_inflight_bytes=a.max_inflight_bytes,
        retry_pushback_ms=a.retry_pushback_ms,
        vision_threads=a.vision_threads,
        inter_op_threads=a.inter_op_threads,
        allow_spinning=a.ort_allow_spinning,
        exit_timeout_s=a.exit_timeout_secs,
        strict_readiness=a.strict_readiness,
        model_control_mode=a.model_control_mode,
        repository_poll_secs=a.repository_poll_secs,
        allow_grpc=a.allow_grpc,
        load_models=a.load_model,
        ready_file=a.ready_file,
        grpc_tls=grpc_tls,
        grpc_access=grpc_access,
        reuse_port=role is not None,
        allow_http=a.allow_http,
        http_address=a.http_address,
        http_port=a.http_port,
        http_tls=http_tls,
        http_access=http_access,
        http_limits=HttpLimits(
            a.http_max_input_size, a.http_body_timeout_secs, a.http_idle_timeout_secs, a.http_max_header_bytes
        ),
    )
    try:
        asyncio.run(serve(cfg))
    except StartupError as exc:  # one line, no traceback: everything bound so far was released
        raise SystemExit(f"python -m server: error: {exc}") from None


if __name__ == "__main__":
    main()
