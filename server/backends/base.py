"""The one interface the service and the batcher know a backend by.

A backend owns one loaded model version and executes whole batches. `execute` is called from a worker
thread (ONNX Runtime and TensorRT release the GIL), at most `concurrent_executions` at a time per
instance (1 unless the backend says otherwise); the batcher
runs `instance_count` instances for concurrent executions. Adding TensorRT, a CUDA provider or torch
means adding a class here and registering it: nothing in the service or batcher changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class BackendUnavailable(RuntimeError):
    """The machine lacks what this backend needs (no GPU, no TensorRT, ...): the model fails to load,
    with this message, and the rest of the repository keeps serving."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype  # numpy dtype; the protocol name comes from server's datatype table
    shape: tuple[int, ...]  # per-request shape WITHOUT the batch dimension; -1 = variable


@dataclass(frozen=True)
class BackendOptions:
    intra_op_threads: int = 0  # 0: library default
    inter_op_threads: int = 0
    device_id: int = 0
    # Free-form settings from config.pbtxt (parameters / optimization), e.g. execution accelerators.
    extra: tuple[tuple[str, str], ...] = ()
    # max_batch_size > 0 in the config: the model's first dimension is the batch, absent from TensorSpec.
    batched: bool = True
    # From config.pbtxt: instance_group kind ("cpu" | "gpu") and optimization.execution_accelerators
    # as (name, ((key, value), ...)) in the config's order, gpu ones first.
    device_kind: str = "cpu"
    accelerators: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    # optimization.cuda.graphs in config.pbtxt, and the config's max_batch_size (the sizes to capture).
    cuda_graphs: bool = False
    max_batch_size: int = 0
    # Where a backend may keep compiled artifacts between loads (OpenVINO's CACHE_DIR); None: no cache.
    # The repository gives <repository>/.cache.
    cache_dir: Path | None = None


class Backend(ABC):
    """One loaded model version. Inputs and outputs carry the batch dimension first."""

    kind: str = "abstract"
    # How many `execute` calls this instance takes at the same time (each from its own thread): the
    # batcher gives it that many execution slots, so the next batch is gathered while one computes.
    concurrent_executions: int = 1

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        self.model_file = Path(model_file)
        self.options = options

    # Filled by each backend as it loads: what the loaded model itself declares.
    _inputs: list[TensorSpec]
    _outputs: list[TensorSpec]

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @abstractmethod
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Arrays are C-contiguous with the batch dimension first."""

    def warm_up(self, inputs: dict[str, np.ndarray]) -> int:
        """Run a warm-up sample on every piece of per-execution state that keeps buffers per batch shape,
        so the first real batches of that shape allocate nothing; returns the executions run. Default:
        one execution (a session shared by every run); OpenVINO runs it on each infer request."""
        self.execute(inputs)
        return 1

    def runtime_turn(self) -> AbstractContextManager[object]:
        """Held by the batcher around each `execute`, after the batch is gathered: a backend that takes more
        executions than its runtime runs at once (ONNX Runtime: one slot gathers while one runs) returns
        its lock, so waiting for the runtime counts as input time, not compute. Default: no wait."""
        return nullcontext()

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:  # noqa: B027 - an optional hook, not abstract
        """Backend-specific request checks, run before queueing so one bad request never fails a batch.
        Raise ValueError with a message naming the input; the default accepts everything."""

    def close(self) -> None:  # noqa: B027 - optional: release sessions, device buffers
        pass


BackendFactory = Callable[[Path, BackendOptions], Backend]
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(kind: str, factory: BackendFactory) -> None:
    _BACKENDS[kind] = factory


def create_backend(kind: str, model_file: Path, options: BackendOptions) -> Backend:
    if kind not in _BACKENDS:
        raise BackendUnavailable(f"unknown backend {kind!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[kind](model_file, options)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)
