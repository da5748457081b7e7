"""Triton's optional latency summaries (`--metrics-config summary_latencies=true`): quantiles over a
sliding time window, next to the cumulative `_count` and `_sum`.

Triton computes them with prometheus-cpp's CKMS summaries (60 s window, quantile:error targets). Here the
window keeps the observations themselves (bounded, newest kept) and the quantiles are exact over it, so
every error target is met; the error values are accepted and shown only for Triton's flag syntax.
Observations arrive on the event loop, quantiles are read by the metrics thread: a lock keeps the
window consistent between the two.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

# Triton's defaults (quantile, allowed error).
DEFAULT_QUANTILES: tuple[tuple[float, float], ...] = (
    (0.5, 0.05),
    (0.9, 0.01),
    (0.95, 0.001),
    (0.99, 0.001),
    (0.999, 0.000001),
)
MAX_AGE_S = 60.0  # prometheus-cpp's default max_age, as Triton uses it
MAX_SAMPLES = 20_000  # per window: bounds memory at ~1 MB per model and stage under any load


@dataclass
class SummaryConfig:
    enabled: bool = False
    quantiles: tuple[tuple[float, float], ...] = DEFAULT_QUANTILES


CONFIG = SummaryConfig()


class MetricsConfigError(ValueError):
    pass


def parse_quantiles(text: str) -> tuple[tuple[float, float], ...]:
    """Triton's `summary_quantiles` value: "<quantile>:<error>,..." with each in [0, 1]."""
    out = []
    for part in text.split(","):
        try:
            q, err = (float(x) for x in part.split(":"))
        except ValueError:
            raise MetricsConfigError(
                f"summary_quantiles: {part!r} is not <quantile>:<error> (e.g. 0.5:0.05,0.99:0.001)"
            ) from None
        if not (0.0 <= q <= 1.0 and 0.0 <= err <= 1.0):
            raise MetricsConfigError(f"summary_quantiles: {part!r}: quantile and error must be in [0, 1]")
        out.append((q, err))
    return tuple(out)


def configure(settings: list[str]) -> SummaryConfig:
    """Applies `--metrics-config KEY=VALUE` flags (Triton's: summary_latencies, summary_quantiles,
    counter_latencies). Unknown keys are refused rather than ignored."""
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise MetricsConfigError(f"--metrics-config {item!r}: expected KEY=VALUE")
        if key == "summary_latencies":
            if value.lower() not in ("true", "false", "1", "0"):
                raise MetricsConfigError(f"--metrics-config summary_latencies: expected true/false, got {value!r}")
            CONFIG.enabled = value.lower() in ("true", "1")
        elif key == "summary_quantiles":
            CONFIG.quantiles = parse_quantiles(value)
        elif key == "counter_latencies" and value.lower() in ("true", "1"):
            pass  # the cumulative *_duration_us counters are always on here
        else:
            raise MetricsConfigError(
                f"--metrics-config {item!r}: supported are summary_latencies=true|false, "
                "summary_quantiles=<q>:<err>,... and counter_latencies=true"
            )
    return CONFIG


@dataclass
class LatencyWindow:
    """Observations (microseconds) of the last MAX_AGE_S seconds, and cumulative count and sum."""

    max_age_s: float = MAX_AGE_S
    count: int = 0
    sum_us: float = 0.0
    _obs: deque = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe_ns(self, ns: int, n: int = 1) -> None:
        us = ns / 1000 / n
        now = time.monotonic()
        with self._lock:
            self.count += n
            self.sum_us += us * n
            self._obs.extend((now, us) for _ in range(n))

    def quantiles(self, qs: list[float]) -> tuple[list[float], int, float]:
        """(quantile values, NaN where the window is empty), count, sum."""
        horizon = time.monotonic() - self.max_age_s
        with self._lock:
            while self._obs and self._obs[0][0] < horizon:
                self._obs.popleft()
            values = sorted(v for _, v in self._obs)
            count, total = self.count, self.sum_us
        if not values:
            return [math.nan] * len(qs), count, total
        # Nearest rank: the smallest observation with at least q of the window at or below it.
        return [values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] for q in qs], count, total
