"""Prometheus metrics: Triton's names, plus the histograms Triton lacks; the page every scraper accepts.

Triton's counters (nv_inference_request_success, ...) are read at scrape time from the same ModelStats
the ModelStatistics RPC answers from, so the two can never disagree. The histograms (request latency,
queue time, executed batch size) make p99 and the real batch sizes visible. With
`--metrics-config summary_latencies=true`, Triton's latency summaries (nv_inference_*_summary_us, with
`quantile` labels) come too (server/latency_summary.py).

One page, two formats, chosen by the scraper's Accept header (or `?format=openmetrics|prometheus`):
- classic Prometheus text 0.0.4 (what Triton serves to everyone): Triton's counters under their exact
  names, without a `_total` suffix, `# HELP`/`# TYPE <name> counter` above samples of that same name;
- OpenMetrics 1.0: the same families, counter samples ending in `_total` as that format requires.
The classic page is served to every client that accepts it, even one that prefers OpenMetrics (every
Prometheus version lists text/plain after OpenMetrics): a scraper then stores Triton's series names, so
dashboards, alerts and autoscaling rules written for Triton work unchanged. OpenMetrics goes to clients
that accept only it (Prometheus with `scrape_protocols: [OpenMetricsText1.0.0]`) or ask with
`?format=openmetrics`; they store counters as `nv_..._total`, as that format defines.
The counters are built as prometheus_client's counter families (samples `<name>_total`); only the
classic writer here names their samples as Triton does.
"""

from __future__ import annotations

import gzip
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from prometheus_client import CollectorRegistry, Counter, Histogram, exposition
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.registry import Collector

from server import latency_summary
from server.stats import FAILURE_REASONS, SUMMARY_STAGES, ModelStats

log = logging.getLogger("cnnserve.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
REQUEST_LATENCY = Histogram(
    "cnnserve_request_latency_seconds",
    "Server-side request latency, arrival to answer (successful requests)",
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "cnnserve_queue_time_seconds",
    "Time a request waited in the dynamic batcher's queue before execution",
    ["model", "version"],
    buckets=(0.0,) + _LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "cnnserve_batch_size",
    "Batch size (items) of each backend execution",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
ACCESS_DENIED = Counter(
    "cnnserve_access_denied",
    "Requests refused by an access key (server/access.py): reason missing or wrong",
    ["protocol", "group", "reason"],
    registry=REGISTRY,
)


# Triton's per-model counters: (family name, HELP text, value from a ModelStats).
_COUNTERS: tuple[tuple[str, str], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes, by reason"),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)"),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds"),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds"),
    (
        "cnnserve_inference_request_never_executed",
        "Requests accepted then expired or cancelled while queued (never executed)",
    ),
)
TRITON_COUNTERS = frozenset(name for name, _ in _COUNTERS)
_SUMMARY_HELP = {
    "request": "Summary of inference request duration in microseconds",
    "queue": "Summary of inference queuing duration in microseconds",
    "compute_input": "Summary of compute input duration in microseconds",
    "compute_infer": "Summary of compute inference duration in microseconds",
    "compute_output": "Summary of compute output duration in microseconds",
}
SUMMARIES = frozenset(f"nv_inference_{stage}_summary_us" for stage in _SUMMARY_HELP)
PENDING = "nv_inference_pending_request_count"
# Every family TritonCollector can yield (what server/workers.py fetches from each worker and sums).
TRITON_FAMILIES = TRITON_COUNTERS | SUMMARIES | {PENDING}


class TritonCollector(Collector):
    """Yields Triton's per-model counters (and summaries, when enabled) from the live ModelStats of
    every loaded version."""

    def __init__(self, stats_source: Callable[[], Iterable[ModelStats]]) -> None:
        self._source = stats_source

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "version"]
        fams = {name: CounterMetricFamily(name, doc, labels=labels) for name, doc in _COUNTERS}
        fams["nv_inference_request_failure"] = CounterMetricFamily(
            "nv_inference_request_failure", dict(_COUNTERS)["nv_inference_request_failure"], labels=[*labels, "reason"]
        )
        pending = GaugeMetricFamily(
            PENDING, "Instantaneous number of pending requests awaiting execution per-model", labels=labels
        )
        summaries = (
            {stage: Metric(f"nv_inference_{stage}_summary_us", doc, "summary") for stage, doc in _SUMMARY_HELP.items()}
            if latency_summary.CONFIG.enabled
            else {}
        )
        qs = [q for q, _ in latency_summary.CONFIG.quantiles]
        for s in list(self._source()):
            lab = [s.name, s.version]
            fams["nv_inference_request_success"].add_metric(lab, s.success.count)
            for reason in FAILURE_REASONS:
                fams["nv_inference_request_failure"].add_metric([*lab, reason], s.failures[reason])
            fams["nv_inference_count"].add_metric(lab, s.inference_count)
            fams["nv_inference_exec_count"].add_metric(lab, s.execution_count)
            fams["nv_inference_request_duration_us"].add_metric(lab, (s.success.ns + s.fail.ns) // 1000)
            fams["nv_inference_queue_duration_us"].add_metric(lab, s.queue.ns // 1000)
            fams["nv_inference_compute_input_duration_us"].add_metric(lab, s.compute_input.ns // 1000)
            fams["nv_inference_compute_infer_duration_us"].add_metric(lab, s.compute_infer.ns // 1000)
            fams["nv_inference_compute_output_duration_us"].add_metric(lab, s.compute_output.ns // 1000)
            fams["cnnserve_inference_request_never_executed"].add_metric(lab, s.never_executed)
            pending.add_metric(lab, s.pending)
            for field_name, stage in SUMMARY_STAGES.items():
                window = getattr(s, field_name).window
                if stage not in summaries or window is None:
                    continue
                values, count, total = window.quantiles(qs)
                fam, base = summaries[stage], {"model": s.name, "version": s.version}
                for q, v in zip(qs, values, strict=True):
                    fam.add_sample(fam.name, {**base, "quantile": exposition.floatToGoString(q)}, v)
                fam.add_sample(fam.name + "_count", base, count)
                fam.add_sample(fam.name + "_sum", base, total)
        yield from fams.values()
        yield pending
        yield from summaries.values()


# -- the page ---------------------------------------------------------------------------------------------
class _One(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        yield self._metric


def classic_text(registry: Collector) -> bytes:
    """The classic text format (0.0.4), with Triton's counters under their own names."""
    out = []
    for metric in registry.collect():
        if metric.type == "counter" and metric.name in TRITON_COUNTERS:
            # Written as a gauge, then typed counter: prometheus_client's classic writer would name the
            # HELP/TYPE `<name>_total`, and its counter samples must end in `_total`.
            plain = Metric(metric.name, metric.documentation, "gauge")
            for s in metric.samples:
                if s.name == metric.name + "_total":
                    plain.add_sample(metric.name, s.labels, s.value)
            text = exposition.generate_latest(_One(plain)).decode()
            out.append(text.replace(f"# TYPE {metric.name} gauge\n", f"# TYPE {metric.name} counter\n", 1))
        else:
            out.append(exposition.generate_latest(_One(metric)).decode())
    return "".join(out).encode()


OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
CLASSIC_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def wants_openmetrics(accept: str | None, fmt: str | None = None) -> bool:
    """OpenMetrics when asked by `?format=`, or when the Accept header takes it but not the classic text."""
    if fmt:
        return fmt.lower() == "openmetrics"
    best_om, best_text = 0.0, 0.0
    for part in (accept or "").split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if kind == "application/openmetrics-text":
            best_om = max(best_om, q)
        elif kind in ("text/plain", "*/*", "text/*"):
            best_text = max(best_text, q)
    return best_om > 0 and best_text == 0


def render(registry: Collector, accept: str | None, fmt: str | None = None) -> tuple[bytes, str]:
    """(body, Content-Type) of the metrics page for a scraper's Accept header."""
    if wants_openmetrics(accept, fmt):
        return openmetrics.generate_latest(registry), OPENMETRICS_TYPE
    return classic_text(registry), CLASSIC_TYPE


_FORMATS = ("openmetrics", "prometheus", "text")


def serve_metrics(port: int, address: str, registry: Collector) -> ThreadingHTTPServer:
    """The metrics HTTP endpoint on a daemon thread; `.shutdown()` stops it, `.server_port` is the port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            url = urlparse(self.path)
            fmt = parse_qs(url.query).get("format", [None])[0]
            if fmt is not None and fmt.lower() not in _FORMATS:
                self._answer(
                    400,
                    f"format must be one of {', '.join(_FORMATS)}, got {fmt!r:.40}\n".encode(),
                    "text/plain; charset=utf-8",
                )
                return
            try:
                body, ctype = render(registry, self.headers.get("Accept"), fmt)
            except Exception as exc:  # a broken collector answers 500, the server serves on
                log.exception("metrics page failed")
                self._answer(500, f"metrics collection failed: {exc}\n".encode(), "text/plain; charset=utf-8")
                return
            self._answer(200, body, ctype)

        def _answer(self, status: int, body: bytes, ctype: str) -> None:
            gzipped = "gzip" in (self.headers.get("Accept-Encoding") or "")
            if gzipped:
                body = gzip.compress(body)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not logged
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    httpd = Server((address.strip("[]"), port), Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


# -- --workers: one page from every worker's -----------------------------------------------------------------
def merge_pages(pages: Iterable[str]) -> list[Metric]:
    """The TRITON_FAMILIES of several workers' OpenMetrics pages as one set of families: counters, gauges
    and summaries' _count/_sum summed per label set; a summary quantile is the highest of the workers'
    (quantiles of separate windows cannot be combined exactly; the highest is a bound that never hides
    a slow worker)."""
    families: dict[str, Metric] = {}
    totals: dict[str, dict[tuple[str, tuple], float]] = {}
    for text in pages:
        for fam in parse_openmetrics(text):
            if fam.name not in TRITON_FAMILIES:
                continue
            families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
            acc = totals.setdefault(fam.name, {})
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if "quantile" in s.labels:  # NaN (an empty window) loses to any value
                    acc[key] = max(
                        (v for v in (acc.get(key, math.nan), s.value) if not math.isnan(v)), default=math.nan
                    )
                else:
                    acc[key] = acc.get(key, 0.0) + s.value
    for name, fam in families.items():
        for (sample, labels), value in totals[name].items():
            fam.add_sample(sample, dict(labels), value)
    return list(families.values())
