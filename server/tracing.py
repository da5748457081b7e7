"""Triton's trace extension: which inference requests are traced, and where their timestamps go.

Settings (Triton's names; values are strings, trace_level a list), global and per model:

    trace_level    ["OFF"] or ["TIMESTAMPS"]   (TENSORS is refused: tensors are not recorded here)
    trace_rate     "1000"   trace one request in every N
    trace_count    "-1"     traces left to take (-1: no limit); counts down (answers show what is
                            left), tracing stops at 0; setting it again starts a new count
    log_frequency  "0"      trace mode: write every N traces to <trace_file>.<i>; 0: at shutdown, to trace_file
    trace_file     ""       trace mode's output (Triton's JSON trace format)
    trace_mode     "triton" or "opentelemetry" (set at start with --trace-config mode=...)

Set at start with Triton's `--trace-config [mode,]KEY=VALUE` (level=TIMESTAMPS, rate=1, count, file,
log-frequency, mode=triton|opentelemetry, opentelemetry,url=..., opentelemetry,resource=k=v,
opentelemetry,bsp_schedule_delay=ms), read and changed at run time with GET/POST /v2/trace/setting,
/v2/models/<m>/trace/setting and the gRPC TraceSetting RPC. A model's settings start as a copy of the
global ones; a null (REST) or empty (gRPC) value puts one back to the global value.

A traced request gets Triton's timestamps, on the steady clock in ns: REQUEST_START (received),
QUEUE_START, COMPUTE_START, COMPUTE_INPUT_END, COMPUTE_OUTPUT_START, COMPUTE_END, REQUEST_END. In
triton mode they go to trace_file as Triton writes them; in opentelemetry mode they become spans
(`request`, with children `queue`, `compute` and `response`) exported over OTLP/HTTP.

The request path calls `TRACER.request(...)` around the batcher; the batcher reports the queue and
compute timestamps to the `Trace` it is handed. The same call logs each request at verbose level 1.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos import grpc_service_pb2 as pb
from server.errors import invalid, not_found
from server.logs import verbose, verbose_level

log = logging.getLogger("cnnserve.trace")

LEVELS = ("OFF", "TIMESTAMPS")
MODES = ("triton", "opentelemetry")
SETTING_NAMES = ("trace_file", "trace_level", "trace_rate", "trace_count", "log_frequency", "trace_mode")
DEFAULT_OTLP_URL = "http://localhost:4318/v1/traces"
_VERBOSE_1 = verbose_level(1)
_UNTRACED: AbstractContextManager[None] = nullcontext()


class TraceConfigError(ValueError):
    pass


@dataclass
class TraceSettings:
    trace_level: tuple[str, ...] = ("OFF",)
    trace_rate: int = 1000
    trace_count: int = -1
    log_frequency: int = 0
    trace_file: str = ""
    trace_mode: str = "triton"

    def as_strings(self) -> dict[str, str | list[str]]:
        return {
            "trace_file": self.trace_file,
            "trace_level": list(self.trace_level),
            "trace_rate": str(self.trace_rate),
            "trace_count": str(self.trace_count),
            "log_frequency": str(self.log_frequency),
            "trace_mode": self.trace_mode,
        }

    @property
    def on(self) -> bool:
        return "TIMESTAMPS" in self.trace_level


def _integer(key: str, value: Any, low: int) -> int:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise invalid(f"trace setting '{key}' must be an integer string, got {type(value).__name__}")
    try:
        n = int(value)
    except ValueError:
        raise invalid(f"trace setting '{key}' must be an integer, got {value!r:.40}") from None
    if n < low:
        raise invalid(f"trace setting '{key}' must be >= {low}, got {n}")
    return n


def _checked(key: str, value: Any) -> Any:
    """One setting from a request (JSON value or gRPC string list) as TraceSettings holds it."""
    if key == "trace_level":
        levels = value if isinstance(value, list) else [value]
        if not levels or not all(isinstance(v, str) for v in levels):
            raise invalid("trace setting 'trace_level' must be a list of strings (OFF, TIMESTAMPS)")
        for v in levels:
            if v not in LEVELS:
                raise invalid(
                    f"trace setting 'trace_level': {v!r:.40} is not supported; levels are "
                    f"{', '.join(LEVELS)} (TENSORS: tensors are not recorded by this server)"
                )
        return ("OFF",) if levels == ["OFF"] or "TIMESTAMPS" not in levels else ("TIMESTAMPS",)
    if key == "trace_rate":
        return _integer(key, value, 1)
    if key == "trace_count":
        return _integer(key, value, -1)
    if key == "log_frequency":
        return _integer(key, value, 0)
    if key == "trace_file":
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise invalid(f"trace setting 'trace_file' must be a string, got {type(value).__name__}")
        return value
    if key == "trace_mode":
        raise invalid("trace setting 'trace_mode' is fixed at start (--trace-config mode=...)")
    raise invalid(f"trace setting '{key:.64}' is not one of {', '.join(SETTING_NAMES)}")


# -- one traced request ----------------------------------------------------------------------------------------
@dataclass
class Trace:
    id: int
    model: str
    version: str
    request_id: str
    timestamps: dict[str, int] = field(default_factory=dict)  # name -> steady-clock ns

    def computed(
        self, queue_start: int, compute_start: int, input_end: int, output_start: int, compute_end: int
    ) -> None:
        """The batcher's report (from its execution thread) once the request's batch ran."""
        self.timestamps.update(
            QUEUE_START=queue_start,
            COMPUTE_START=compute_start,
            COMPUTE_INPUT_END=input_end,
            COMPUTE_OUTPUT_START=output_start,
            COMPUTE_END=compute_end,
        )

    def ordered(self) -> list[dict[str, Any]]:
        return [{"name": k, "ns": v} for k, v in sorted(self.timestamps.items(), key=lambda kv: kv[1])]


class _Sampler:
    """Rate and count for one settings scope (global, or one model's)."""

    def __init__(self, settings: TraceSettings) -> None:
        self.settings = settings
        self.seen = 0
        self.left = settings.trace_count

    def take(self) -> bool:
        s = self.settings
        if not s.on or self.left == 0:
            return False
        self.seen += 1
        if self.seen % s.trace_rate:
            return False
        if self.left > 0:
            self.left -= 1
        return True


class _FileSink:
    """Triton mode: traces collected and written as Triton's JSON trace file."""

    def __init__(self) -> None:
        self._pending: dict[str, list[Trace]] = {}
        self._index: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, trace: Trace, settings: TraceSettings) -> None:
        if not settings.trace_file:
            return
        with self._lock:
            batch = self._pending.setdefault(settings.trace_file, [])
            batch.append(trace)
            if settings.log_frequency and len(batch) >= settings.log_frequency:
                i = self._index.get(settings.trace_file, 0)
                self._index[settings.trace_file] = i + 1
                self._write(Path(f"{settings.trace_file}.{i}"), batch)
                self._pending[settings.trace_file] = []

    def reset_index(self, trace_file: str) -> None:
        with self._lock:
            self._index.pop(trace_file, None)

    def flush(self) -> None:
        """At shutdown: what is left goes to trace_file itself (log_frequency 0), as Triton does."""
        with self._lock:
            for path, batch in self._pending.items():
                if batch:
                    self._write(Path(path) if path not in self._index else Path(f"{path}.{self._index[path]}"), batch)
            self._pending.clear()

    @staticmethod
    def _write(path: Path, traces: list[Trace]) -> None:
        doc: list[dict[str, Any]] = []
        for t in traces:
            doc.append(
                {
                    "id": t.id,
                    "model_name": t.model,
                    "model_version": int(t.version) if t.version.isdigit() else t.version,
                    "request_id": t.request_id,
                }
            )
            doc.append({"id": t.id, "timestamps": t.ordered()})
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.replace(path)
        except OSError as exc:
            log.error("trace file not written", extra={"trace_file": str(path), "error": str(exc)})


class _OtelSink:
    """OpenTelemetry mode: each trace as spans, batched to an OTLP/HTTP endpoint."""

    def __init__(self, url: str, resource: Mapping[str, str], schedule_delay_ms: float | None) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": "cnnserve", **resource}))
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=url), schedule_delay_millis=schedule_delay_ms)
        )
        self.tracer = self.provider.get_tracer("cnnserve")
        # Span times are wall-clock ns; the trace's timestamps are steady-clock ns.
        self._offset = time.time_ns() - time.perf_counter_ns()

    def add(self, trace: Trace, settings: TraceSettings) -> None:
        from opentelemetry import trace as otel

        ts = {k: v + self._offset for k, v in trace.timestamps.items()}
        start, end = ts["REQUEST_START"], ts["REQUEST_END"]
        root = self.tracer.start_span(
            "request",
            start_time=start,
            attributes={
                "triton.model_name": trace.model,
                "triton.model_version": trace.version,
                "triton.trace_id": trace.id,
                "triton.request_id": trace.request_id,
            },
        )
        ctx = otel.set_span_in_context(root)
        if "COMPUTE_START" in ts:
            spans = [
                ("queue", ts["QUEUE_START"], ts["COMPUTE_START"]),
                ("compute", ts["COMPUTE_START"], ts["COMPUTE_END"]),
                ("response", ts["COMPUTE_END"], end),
            ]
            for name, a, b in spans:
                span = self.tracer.start_span(name, context=ctx, start_time=a)
                if name == "compute":
                    span.add_event("COMPUTE_INPUT_END", timestamp=ts["COMPUTE_INPUT_END"])
                    span.add_event("COMPUTE_OUTPUT_START", timestamp=ts["COMPUTE_OUTPUT_START"])
                span.end(end_time=b)
        else:  # failed before it executed
            root.set_status(otel.Status(otel.StatusCode.ERROR, "not executed"))
        root.end(end_time=end)

    def flush(self) -> None:
        self.provider.shutdown()  # exports what is batched, then stops the exporter thread


class Tracer:
    def __init__(self) -> None:
        self.settings = TraceSettings()
        self._initial = TraceSettings()
        self._models: dict[str, dict[str, Any]] = {}  # per-model overrides of the global settings
        self._samplers: dict[str | None, _Sampler] = {None: _Sampler(self.settings)}
        self._ids = 0
        self._file = _FileSink()
        self._otel: _OtelSink | None = None
        self._lock = threading.Lock()

    # -- configuration ----------------------------------------------------------------------------------------
    def configure(self, flags: list[str], export: bool = True) -> None:
        """Triton's --trace-config flags, at start; `export=False` only checks them (the --workers
        supervisor, which serves no request, so a mistake is said once, before any worker starts)."""
        otel: dict[str, str] = {}
        resource: dict[str, str] = {}
        s = TraceSettings()
        names = {
            "level": "trace_level",
            "rate": "trace_rate",
            "count": "trace_count",
            "log-frequency": "log_frequency",
            "log_frequency": "log_frequency",
            "file": "trace_file",
        }
        for flag in flags:
            mode, sep, rest = flag.partition(",")
            if not sep:
                mode, rest = "", flag
            key, eq, value = rest.partition("=")
            if not eq:
                raise TraceConfigError(f"--trace-config {flag!r}: expected [MODE,]KEY=VALUE")
            if mode == "opentelemetry":
                if key == "resource":
                    k, _, v = value.partition("=")
                    resource[k] = v
                elif key in ("url", "bsp_schedule_delay"):
                    otel[key] = value
                else:
                    raise TraceConfigError(
                        f"--trace-config {flag!r}: opentelemetry settings are url, resource, bsp_schedule_delay"
                    )
            elif mode in ("", "triton"):
                if key == "mode":
                    if value not in MODES:
                        raise TraceConfigError(f"--trace-config mode={value!r}: modes are {', '.join(MODES)}")
                    s.trace_mode = value
                elif key in names:
                    try:
                        setattr(s, names[key], _checked(names[key], value.split(",") if key == "level" else value))
                    except Exception as exc:  # InferError: said as a flag error
                        raise TraceConfigError(f"--trace-config {flag!r}: {getattr(exc, 'message', exc)}") from None
                else:
                    raise TraceConfigError(
                        f"--trace-config {flag!r}: settings are level, rate, count, file, log-frequency, mode"
                    )
            else:
                raise TraceConfigError(f"--trace-config {flag!r}: unknown mode {mode!r} (triton, opentelemetry)")
        try:
            delay = float(otel["bsp_schedule_delay"]) if "bsp_schedule_delay" in otel else None
        except ValueError:
            raise TraceConfigError(
                f"--trace-config opentelemetry,bsp_schedule_delay={otel['bsp_schedule_delay']!r}: expected milliseconds"
            ) from None
        if s.trace_mode == "triton" and s.on and not s.trace_file:
            raise TraceConfigError("--trace-config level=TIMESTAMPS in triton mode needs file=PATH")
        if not export:
            return
        if s.trace_mode == "opentelemetry":
            self._otel = _OtelSink(otel.get("url", DEFAULT_OTLP_URL), resource, delay)
        self.settings = s
        self._initial = TraceSettings(**vars(s))
        self._samplers = {None: _Sampler(s)}

    def model_settings(self, model: str | None) -> TraceSettings:
        if model is None or model not in self._models:
            return self.settings
        return TraceSettings(**{**vars(self.settings), **self._models[model]})

    def update(self, model: str | None, updates: Mapping[str, Any]) -> dict[str, Any]:
        """Apply settings (all or none; None values reset) and answer the scope's current ones."""
        changes = {k: (None if v is None or v == [] else _checked(k, v)) for k, v in updates.items()}
        if not changes:  # a read: the samplers (and what is left of their counts) stay as they are
            return self.answer(model)
        with self._lock:
            if model is None:
                new = TraceSettings(
                    **{
                        **vars(self.settings),
                        **{k: getattr(self._initial, k) if v is None else v for k, v in changes.items()},
                    }
                )
                self._check_sink(new)
                self.settings = new
                self._samplers = {None: _Sampler(new), **{m: _Sampler(self.model_settings(m)) for m in self._models}}
            else:
                overrides = dict(self._models.get(model, {}))
                for k, v in changes.items():
                    if v is None:
                        overrides.pop(k, None)
                    else:
                        overrides[k] = v
                merged = TraceSettings(**{**vars(self.settings), **overrides})
                self._check_sink(merged)
                if overrides:
                    self._models[model] = overrides
                    self._samplers[model] = _Sampler(merged)
                else:
                    self._models.pop(model, None)
                    self._samplers.pop(model, None)
            if "trace_file" in changes:
                self._file.reset_index(self.model_settings(model).trace_file)
        log.info("trace settings changed", extra={"model": model or "", "changed": changes})
        return self.answer(model)

    def answer(self, model: str | None) -> dict[str, Any]:
        """A scope's settings as the extension answers them: trace_count is what is left, as in Triton."""
        out = self.model_settings(model).as_strings()
        out["trace_count"] = str((self._samplers.get(model) or self._samplers[None]).left)
        return out

    def _check_sink(self, s: TraceSettings) -> None:
        if s.on and s.trace_mode == "triton" and not s.trace_file:
            raise invalid("trace setting 'trace_level' TIMESTAMPS needs a 'trace_file' in triton mode")

    # -- the request path's hook ------------------------------------------------------------------------------
    def request(
        self, model: str, version: int | str, request_id: str, received_ns: int
    ) -> AbstractContextManager[Trace | None]:
        """Around one inference request: a context giving the batcher a Trace when this request is
        sampled, None otherwise (a shared null context: nothing is allocated per untraced request)."""
        if log.isEnabledFor(_VERBOSE_1):
            verbose(log, 1, "inference request", extra={"model": model, "version": str(version), "id": request_id})
        sampler = self._samplers.get(model) or self._samplers[None]
        if not sampler.take():
            return _UNTRACED
        with self._lock:
            self._ids += 1
            trace = Trace(self._ids, model, str(version), request_id, {"REQUEST_START": received_ns})
        return self._traced(trace, sampler.settings)

    @contextmanager
    def _traced(self, trace: Trace, settings: TraceSettings) -> Iterator[Trace]:
        try:
            yield trace
        finally:
            trace.timestamps["REQUEST_END"] = time.perf_counter_ns()
            try:
                if self._otel is not None:
                    self._otel.add(trace, settings)
                else:
                    self._file.add(trace, settings)
            except Exception as exc:  # tracing never fails a request
                log.error("trace not recorded", extra={"error": str(exc)})

    def close(self) -> None:
        self._file.flush()
        if self._otel is not None:
            self._otel.flush()


TRACER = Tracer()


# -- the bindings' calls --------------------------------------------------------------------------------------
def check_model(repository: Any, model: str) -> None:
    if model and model not in repository.models and model not in set(repository.names_on_disk()):
        raise not_found(f"model '{model:.128}' is not in the repository")


def setting_rpc(request: pb.TraceSettingRequest, repository: Any) -> pb.TraceSettingResponse:
    check_model(repository, request.model_name)
    updates = {k: list(v.value) for k, v in request.settings.items()}
    answer = pb.TraceSettingResponse()
    for key, value in TRACER.update(request.model_name or None, updates).items():
        answer.settings[key].value.extend(value if isinstance(value, list) else [value])
    return answer
