"""Per model-version counters: the one source for the ModelStatistics RPC and the Prometheus scrape.

Updated only on the event loop thread (the batcher hands timings measured in worker threads back to
the loop), read by the metrics HTTP thread; plain ints under the GIL need no lock for that.
Durations are nanoseconds, as in the protocol's StatisticDuration.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from server import latency_summary


@dataclass
class Duration:
    count: int = 0
    ns: int = 0
    window: latency_summary.LatencyWindow | None = field(default=None, compare=False, repr=False)

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns
        if self.window is not None:  # --metrics-config summary_latencies=true
            self.window.observe_ns(ns, count)


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


# The durations Triton's latency summaries are kept for (nv_inference_<stage>_summary_us).
SUMMARY_STAGES = {
    "success": "request",
    "queue": "queue",
    "compute_input": "compute_input",
    "compute_infer": "compute_infer",
    "compute_output": "compute_output",
}

# Why a request failed; the `reason` label of nv_inference_request_failure.
FAILURE_REASONS = ("REJECTED", "TIMEOUT", "CANCELED", "INVALID", "BACKEND")


@dataclass
class ModelStats:
    name: str
    version: str
    success: Duration = field(default_factory=Duration)  # whole request, arrival to answer
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    failures: dict[str, int] = field(default_factory=lambda: {r: 0 for r in FAILURE_REASONS})
    inference_count: int = 0  # batch items executed (a request of batch 4 counts 4)
    execution_count: int = 0  # backend executions (one per formed batch)
    never_executed: int = 0  # accepted, then expired or cancelled while queued
    pending: int = 0  # accepted, not yet answered
    last_inference_ms: int = 0
    batch: dict[int, BatchDurations] = field(default_factory=lambda: defaultdict(BatchDurations))

    def __post_init__(self) -> None:
        if latency_summary.CONFIG.enabled:
            for name in SUMMARY_STAGES:
                getattr(self, name).window = latency_summary.LatencyWindow()

    def record_failure(self, reason: str, duration_ns: int) -> None:
        self.failures[reason] += 1
        self.fail.add(duration_ns)

    def record_execution(self, batch_items: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        # Triton's convention: every request in a batch is charged the batch's compute durations.
        self.execution_count += 1
        self.inference_count += batch_items
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        b = self.batch[batch_items]
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)
        self.last_inference_ms = int(time.time() * 1000)
