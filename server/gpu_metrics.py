"""Per-GPU Prometheus gauges from NVML, with Triton's names and `gpu_uuid` label.

    nv_gpu_utilization         GPU utilization rate, 0.0 - 1.0
    nv_gpu_memory_total_bytes  total GPU memory
    nv_gpu_memory_used_bytes   used GPU memory
    nv_gpu_power_usage         power draw in watts

A custom collector reads NVML at scrape time rather than on a timer: the values are as fresh as the
scrape and nothing runs between scrapes. Without NVML (no nvidia-ml-py, no driver, no GPU: every CPU
machine) registration logs one line and does nothing, so the server starts the same everywhere.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CollectorRegistry, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

GPU_METRIC_NAMES = (
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlCollector(Collector):
    """Collects the four gauges for every GPU NVML sees. `nvml` is the pynvml module (initialised)."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        count = nvml.nvmlDeviceGetCount()
        self._devices = []
        for i in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            self._devices.append((_text(nvml.nvmlDeviceGetUUID(handle)), handle))

    @property
    def gpu_count(self) -> int:
        return len(self._devices)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        util = GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"])
        total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"])
        used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"])
        power = GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage in watts", labels=["gpu_uuid"])
        for uuid, handle in self._devices:
            # One failing query (a GPU fallen off the bus, power readout unsupported on some boards)
            # drops that sample, not the whole scrape.
            try:
                util.add_metric([uuid], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            except nvml.NVMLError as exc:
                log.debug("nvml utilization for %s: %s", uuid, exc)
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                total.add_metric([uuid], float(mem.total))
                used.add_metric([uuid], float(mem.used))
            except nvml.NVMLError as exc:
                log.debug("nvml memory for %s: %s", uuid, exc)
            try:
                power.add_metric([uuid], nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # NVML reports mW
            except nvml.NVMLError as exc:
                log.debug("nvml power for %s: %s", uuid, exc)
        yield from (util, total, used, power)


# Keyed by the registry itself, weakly: an id() outlives its registry, so a new registry given a
# collected one's address was taken for registered and got no GPU series (a flaky test_deploy run).
_registered: weakref.WeakKeyDictionary[CollectorRegistry, NvmlCollector] = weakref.WeakKeyDictionary()


def register_gpu_metrics(registry: CollectorRegistry | None = None, nvml: Any | None = None) -> NvmlCollector | None:
    """Register the NVML collector on `registry` (default: the server's, server.metrics.REGISTRY);
    None (with a log line) when NVML is not available. Idempotent per registry, so a server restarted
    inside one process (tests) does not register the same series twice."""
    if registry is None:
        from server.metrics import REGISTRY

        registry = REGISTRY
    if registry in _registered:
        return _registered[registry]
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            log.info("GPU metrics disabled: nvidia-ml-py (pynvml) is not installed")
            return None
        nvml = pynvml
    try:
        nvml.nvmlInit()
        collector = NvmlCollector(nvml)
    except nvml.NVMLError as exc:
        log.info("GPU metrics disabled: NVML unavailable (%s)", exc)
        return None
    if collector.gpu_count == 0:
        log.info("GPU metrics disabled: NVML sees no GPU")
        return None
    registry.register(collector)
    _registered[registry] = collector
    log.info("GPU metrics enabled for %d GPU(s)", collector.gpu_count)
    return collector
