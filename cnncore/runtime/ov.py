"""OpenVINO compiled models: the properties, the factory, and the bounded dynamic batch.

Defaults are the server's: the CPU plugin, a LATENCY performance hint, and inference precision pinned to
f32, because on CPUs with bfloat16 support (this one has avx512_bf16) OpenVINO would otherwise run FP32
models in bfloat16 and answer with other numbers than the graph's. openvino is imported when a model is
compiled: the serving half without it still imports this module.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnncore.runtime.errors import RuntimeUnavailable

_FIRST_USE = threading.Lock()
_first_use_done = False


def import_openvino() -> Any:
    global _first_use_done
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeUnavailable(f"openvino is not installed ({exc}); pip install openvino") from None
    if not _first_use_done:
        # Type.to_dtype() builds a C++ function-local static on its first call and waits for the GIL
        # inside that initialisation: two loading threads making the first call at once deadlock (one
        # holds the static's guard waiting for the GIL, the other the GIL waiting for the guard; seen as
        # a server hung at start, 4 models loading in parallel). Made once, under a lock whose waiters
        # release the GIL.
        with _FIRST_USE:
            if not _first_use_done:
                for name in ("f32", "f16", "f64", "i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64", "boolean"):
                    getattr(openvino.Type, name).to_dtype()
                _first_use_done = True
    return openvino


def openvino_available() -> bool:
    try:
        import_openvino()
    except RuntimeUnavailable:
        return False
    return True


@dataclass(frozen=True)
class OpenVinoSettings:
    """compile_model's device and properties, by their OpenVINO names in `properties()`."""

    device: str = "CPU"
    threads: int = 0  # INFERENCE_NUM_THREADS; 0: the plugin's default (all cores)
    streams: int | str | None = None  # NUM_STREAMS: a count or "AUTO"; None: what the hint picks
    performance_hint: str = "LATENCY"  # PERFORMANCE_HINT: LATENCY | THROUGHPUT | CUMULATIVE_THROUGHPUT
    precision_hint: str = "f32"  # INFERENCE_PRECISION_HINT: f32 | bf16 | f16
    # ENABLE_CPU_PINNING; None: the plugin's choice (on, on Linux). Off by default, so export's variant
    # and batch-size measurements run as the server does: on cores shared with the server's own threads,
    # its clients and other processes a pinned thread waits for its core while another is free (raw at
    # batch 2-8 ran 1.5-3x slower pinned on 2 shared cores; README, "As users measure").
    cpu_pinning: bool | None = False
    cache_dir: Path | None = None  # CACHE_DIR: compiled blobs kept there, so a second load skips compiling
    extra: Mapping[str, object] = field(default_factory=dict)  # further properties by name; they win

    def properties(self) -> dict[str, object]:
        props: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": self.precision_hint,
            "PERFORMANCE_HINT": self.performance_hint,
        }
        if self.threads > 0:
            props["INFERENCE_NUM_THREADS"] = self.threads
        if self.streams is not None:
            props["NUM_STREAMS"] = self.streams
        if self.cpu_pinning is not None:
            props["ENABLE_CPU_PINNING"] = self.cpu_pinning
        if self.cache_dir is not None:
            props["CACHE_DIR"] = str(self.cache_dir)
        props.update(self.extra)
        return props


# What decides how a compiled model uses the CPU, as OpenVINO resolved it (a hint picks streams and
# threads; the plugin picks pinning): two processes compare these to know they run the same way.
REPORTED_PROPERTIES = (
    "PERFORMANCE_HINT",
    "NUM_STREAMS",
    "INFERENCE_NUM_THREADS",
    "ENABLE_CPU_PINNING",
    "ENABLE_HYPER_THREADING",
    "SCHEDULING_CORE_TYPE",
    "INFERENCE_PRECISION_HINT",
    "OPTIMAL_NUMBER_OF_INFER_REQUESTS",
)


def compiled_properties(compiled: Any) -> dict[str, str]:
    """REPORTED_PROPERTIES of a compiled model as OpenVINO resolved them, as text (JSON-safe, comparable
    across processes); a property this OpenVINO lacks is left out."""
    out: dict[str, str] = {}
    for key in REPORTED_PROPERTIES:
        try:
            value = compiled.get_property(key)
        except RuntimeError:
            continue
        out[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return out


def compile_openvino(
    model: str | Path, properties: Mapping[str, object] | None = None, *, device: str = "CPU", max_batch: int = 0
) -> Any:
    """`model` (ONNX or IR) compiled for `device` with `properties` (OpenVinoSettings().properties() when
    None). `max_batch` > 0 bounds every input's first dimension to [1..max_batch], so the CPU plugin
    plans for the sizes a batcher sends instead of any size."""
    ov = import_openvino()
    core = ov.Core()
    graph = core.read_model(str(model))
    if max_batch > 0:
        graph.reshape(
            {
                p.get_any_name(): ov.PartialShape([ov.Dimension(1, max_batch), *list(p.get_partial_shape())[1:]])
                for p in graph.inputs
            }
        )
    return core.compile_model(
        graph, device, dict(OpenVinoSettings().properties() if properties is None else properties)
    )
