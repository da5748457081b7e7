"""NVML GPU gauges: a logged no-op without NVML, Triton's names and units with it.

NVML cannot run on a machine without an NVIDIA driver, so the collector's arithmetic is checked against
a small stand-in with pynvml's function names and return shapes; on a GPU machine the real one is used.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.gpu_metrics import GPU_METRIC_NAMES, register_gpu_metrics


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:  # ImportError or any NVMLError
        return False


HAVE_NVML = _nvml_works()


class _NVMLError(Exception):
    pass


class StandInNvml:
    """pynvml's surface as the collector uses it: mW power, percent utilization, bytes of memory."""

    NVMLError = _NVMLError

    def __init__(self, gpus: list[dict]) -> None:
        self.gpus = gpus
        self.initialised = False

    def nvmlInit(self):
        self.initialised = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.gpus[h]["uuid"]

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.gpus[h]["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=self.gpus[h]["total"], used=self.gpus[h]["used"], free=0)

    def nvmlDeviceGetPowerUsage(self, h):
        if self.gpus[h]["power_mw"] is None:
            raise _NVMLError("Not Supported")
        return self.gpus[h]["power_mw"]


def _scrape(registry) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, s.labels.get("gpu_uuid", ""))] = s.value
    return out


@pytest.mark.skipif(HAVE_NVML, reason="checks the no-op on machines without NVML")
def test_without_nvml_registration_is_a_logged_no_op(caplog):
    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO, logger="server.gpu_metrics"):
        assert register_gpu_metrics(registry) is None
    assert "GPU metrics disabled" in caplog.text
    assert generate_latest(registry) == b""


def test_gauges_per_gpu_with_triton_names_and_units():
    nvml = StandInNvml(
        [
            {"uuid": "GPU-aaaa", "util": 87, "total": 24 << 30, "used": 3 << 30, "power_mw": 150_500},
            {"uuid": b"GPU-bbbb", "util": 0, "total": 80 << 30, "used": 1 << 20, "power_mw": None},
        ]
    )
    registry = CollectorRegistry()
    collector = register_gpu_metrics(registry, nvml=nvml)
    assert collector is not None and collector.gpu_count == 2 and nvml.initialised
    samples = _scrape(registry)
    assert {name for name, _ in samples} == set(GPU_METRIC_NAMES)
    assert samples[("nv_gpu_utilization", "GPU-aaaa")] == pytest.approx(0.87)
    assert samples[("nv_gpu_memory_total_bytes", "GPU-aaaa")] == 24 << 30
    assert samples[("nv_gpu_memory_used_bytes", "GPU-bbbb")] == 1 << 20
    assert samples[("nv_gpu_power_usage", "GPU-aaaa")] == pytest.approx(150.5)
    # A GPU whose board does not report power loses that one sample, not the scrape.
    assert ("nv_gpu_power_usage", "GPU-bbbb") not in samples
    # Values are read at scrape time.
    nvml.gpus[0]["util"] = 12
    assert _scrape(registry)[("nv_gpu_utilization", "GPU-aaaa")] == pytest.approx(0.12)


def test_nvml_without_gpus_registers_nothing(caplog):
    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO, logger="server.gpu_metrics"):
        assert register_gpu_metrics(registry, nvml=StandInNvml([])) is None
    assert "sees no GPU" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_NVML, reason="NVML (NVIDIA driver + nvidia-ml-py) not available")
def test_real_nvml_reports_memory():
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry) is not None
    samples = _scrape(registry)
    totals = [v for (n, _), v in samples.items() if n == "nv_gpu_memory_total_bytes"]
    assert totals and all(v > 1 << 30 for v in totals)
