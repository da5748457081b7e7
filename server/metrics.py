"""Prometheus metrics: Triton's names, plus the histograms Triton lacks.

Triton's counters are exposed under their exact names (no `_total` suffix, which prometheus_client's
Counter would add), so dashboards written for Triton work unchanged. They are read at scrape time from
the same ModelStats the ModelStatistics RPC answers from, so the two can never disagree. The histograms
(request latency, queue time, executed batch size) make p99 and the real batch sizes visible.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.stats import FAILURE_REASONS, ModelStats

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
REQUEST_LATENCY = Histogram(
    "cnnserve_request_latency_seconds", "Server-side request latency, arrival to answer (successful requests)",
    ["model", "version"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "cnnserve_queue_time_seconds", "Time a request waited in the dynamic batcher's queue before execution",
    ["model", "version"], buckets=(0.0,) + _LATENCY_BUCKETS, registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "cnnserve_batch_size", "Batch size (items) of each backend execution",
    ["model", "version"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=REGISTRY,
)
ACCESS_DENIED = Counter(
    "cnnserve_access_denied", "Requests refused by an access key (server/access.py): reason missing or wrong",
    ["protocol", "group", "reason"], registry=REGISTRY,
)


def _counter(name: str, doc: str) -> Metric:
    # A counter family whose samples keep the family name verbatim (Triton style, no `_total`).
    return Metric(name, doc, "counter")


class TritonCollector(Collector):
    """Yields Triton's per-model counters from the live ModelStats of every loaded version."""

    def __init__(self, stats_source: Callable[[], Iterable[ModelStats]]) -> None:
        self._source = stats_source

    def collect(self) -> Iterable[Metric]:
        fams = {
            "success": _counter("nv_inference_request_success", "Number of successful inference requests"),
            "failure": _counter("nv_inference_request_failure", "Number of failed inference requests, by reason"),
            "count": _counter("nv_inference_count", "Number of inferences performed (batch items)"),
            "exec": _counter("nv_inference_exec_count", "Number of model executions performed (batches)"),
            "req_us": _counter("nv_inference_request_duration_us", "Cumulative request duration in microseconds"),
            "queue_us": _counter("nv_inference_queue_duration_us", "Cumulative time requests spent queued, us"),
            "in_us": _counter("nv_inference_compute_input_duration_us", "Cumulative compute input duration, us"),
            "infer_us": _counter("nv_inference_compute_infer_duration_us", "Cumulative compute infer duration, us"),
            "out_us": _counter("nv_inference_compute_output_duration_us", "Cumulative compute output duration, us"),
            "dropped": _counter("cnnserve_inference_request_never_executed",
                                "Requests accepted then expired or cancelled while queued (never executed)"),
        }
        pending = GaugeMetricFamily("nv_inference_pending_request_count",
                                    "Instantaneous number of pending requests awaiting execution", labels=["model", "version"])
        for s in list(self._source()):
            lab = {"model": s.name, "version": s.version}
            fams["success"].add_sample("nv_inference_request_success", lab, s.success.count)
            for reason in FAILURE_REASONS:
                fams["failure"].add_sample("nv_inference_request_failure", {**lab, "reason": reason}, s.failures[reason])
            fams["count"].add_sample("nv_inference_count", lab, s.inference_count)
            fams["exec"].add_sample("nv_inference_exec_count", lab, s.execution_count)
            fams["req_us"].add_sample("nv_inference_request_duration_us", lab, (s.success.ns + s.fail.ns) // 1000)
            fams["queue_us"].add_sample("nv_inference_queue_duration_us", lab, s.queue.ns // 1000)
            fams["in_us"].add_sample("nv_inference_compute_input_duration_us", lab, s.compute_input.ns // 1000)
            fams["infer_us"].add_sample("nv_inference_compute_infer_duration_us", lab, s.compute_infer.ns // 1000)
            fams["out_us"].add_sample("nv_inference_compute_output_duration_us", lab, s.compute_output.ns // 1000)
            fams["dropped"].add_sample("cnnserve_inference_request_never_executed", lab, s.never_executed)
            pending.add_metric([s.name, s.version], s.pending)
        yield from fams.values()
        yield pending
