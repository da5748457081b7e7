"""Server-wide admission: a bound on inference requests and request bytes held at once.

Per-model queue bounds (config.pbtxt max_queue_size) bound each batcher; this bounds the whole process,
counting every inference request (both APIs) from arrival to answer, decoding included, so a burst
over many models, or of huge messages, cannot grow memory without limit. Over the limit a request is
refused at once with RESOURCE_EXHAUSTED and gRPC's `grpc-retry-pushback-ms` trailer, which a client's
retry policy honours as "retry after this long" (gRPC A6), and the refusal is counted in
`cnnserve_admission_refused_total{limit="requests"|"bytes"}`.

    admission = Admission(max_requests=256, max_bytes=512 << 20)
    with admission.admit(len(raw_request)):   # AdmissionRefused (an InferError) when over
        ...                                    # decode, infer, answer

A model's full queue (the batcher's RESOURCE_EXHAUSTED) is refused the same way: any RESOURCE_EXHAUSTED
leaving an admitted request gets the trailer too, so clients back off from either bound alike.

A request larger than the whole byte budget is admitted when nothing else is in flight, so a budget
below one message never refuses a client forever (gRPC's message limit bounds it instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from prometheus_client import Counter, Gauge

from server.errors import InferError
from server.metrics import REGISTRY

PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
DEFAULT_RETRY_PUSHBACK_MS = 100
# Defaults (per server process): far above what the batchers keep busy, far below what exhausts memory.
DEFAULT_MAX_INFLIGHT_REQUESTS = 1024
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024

REFUSED = Counter(
    "cnnserve_admission_refused",
    "Inference requests refused by the server-wide admission limit",
    ["limit"],
    registry=REGISTRY,
)
# livesum: under --workers (prometheus_client's multiprocess mode) the one scrape shows the sum over the
# running workers, not one series per pid; a single process ignores the mode.
INFLIGHT_REQUESTS = Gauge(
    "cnnserve_inflight_requests",
    "Inference requests admitted and not yet answered",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
INFLIGHT_BYTES = Gauge(
    "cnnserve_inflight_request_bytes",
    "Request bytes of the admitted, unanswered requests",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)


class AdmissionRefused(InferError):
    """RESOURCE_EXHAUSTED with the retry pushback trailer (the error boundary sends InferError.trailers)."""

    def __init__(self, message: str, retry_pushback_ms: int) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message, ((PUSHBACK_TRAILER, str(retry_pushback_ms)),))


class Admission:
    """Counts admitted requests and bytes; used only from the event loop thread (no lock needed)."""

    def __init__(
        self, max_requests: int = 0, max_bytes: int = 0, retry_pushback_ms: int = DEFAULT_RETRY_PUSHBACK_MS
    ) -> None:
        if max_requests < 0 or max_bytes < 0 or retry_pushback_ms < 0:
            raise ValueError("admission limits and the retry pushback must be >= 0 (0 = no limit)")
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.retry_pushback_ms = retry_pushback_ms
        self.requests = 0
        self.bytes = 0
        self.admitted = 0  # requests admitted since start: server/heap.py's IdleRelease reads activity from it

    def _refuse(self, limit: str, message: str) -> AdmissionRefused:
        REFUSED.labels(limit).inc()
        return AdmissionRefused(
            f"server is at its {message}; retry after {self.retry_pushback_ms} ms", self.retry_pushback_ms
        )

    @contextmanager
    def admit(self, nbytes: int) -> Iterator[None]:
        """Hold one request of `nbytes` for the `with` block; AdmissionRefused at once when over a limit."""
        if self.max_requests and self.requests >= self.max_requests:
            raise self._refuse("requests", f"limit of {self.max_requests} in-flight requests (--max-inflight-requests)")
        if self.max_bytes and self.requests and self.bytes + nbytes > self.max_bytes:
            raise self._refuse(
                "bytes",
                f"limit of {self.max_bytes} in-flight request bytes "
                f"({self.bytes} held, this request {nbytes}; --max-inflight-bytes)",
            )
        self.requests += 1
        self.bytes += nbytes
        self.admitted += 1
        INFLIGHT_REQUESTS.set(self.requests)
        INFLIGHT_BYTES.set(self.bytes)
        try:
            yield
        except InferError as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not exc.trailers:
                exc.trailers = ((PUSHBACK_TRAILER, str(self.retry_pushback_ms)),)
            raise
        finally:
            self.requests -= 1
            self.bytes -= nbytes
            INFLIGHT_REQUESTS.set(self.requests)
            INFLIGHT_BYTES.set(self.bytes)
