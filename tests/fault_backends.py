"""Test-only backends: executions a test holds and releases, and deliberate faults.

Tests order events by what they can observe, never by how long a computation takes, so a model that
must stay busy while requests queue is held in its backend until the test lets it go:

- In the test process, `GatedBackend(inner, gate)` wraps a real backend; `gate.wait_entered(n)` returns
  once n executions are inside the backend, `gate.open()` lets them (and all later ones) through.
- In a real server process (`python -m server --backend-module fault_backends`; conftest.start_server
  puts tests/ on the server's PYTHONPATH), this module registers backend "test_faulty": an ONNX Runtime
  model (`<version>/model.onnx`) whose executions obey the config's parameters:

      fault_raise_value  a batch whose first input contains this number raises (a backend bug)
      fault_hang_value   a batch whose first input contains this number never returns (a wedged
                         driver call: nothing sets the event it waits on, close() included)
      gate_file          every execution waits until this file exists; `FileGate(path)` is the test's
                         handle on it (close, open, and how many executions have entered)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from server.backends.base import Backend, BackendOptions, register_backend
from server.backends.ort_backend import OrtBackend

KIND = "test_faulty"


class Gate:
    """Holds executions until opened; counts how many have entered."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._cond = threading.Condition()
        self.entered = 0

    def pass_through(self) -> None:
        with self._cond:
            self.entered += 1
            self._cond.notify_all()
        self._open.wait()

    def open(self) -> None:
        self._open.set()

    def wait_entered(self, n: int, timeout: float = 30.0) -> None:
        """Block until n executions have entered (a failure guard, not an ordering device: timeout only
        turns a hang into a clear error)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.entered >= n, timeout):
                raise AssertionError(f"only {self.entered} of {n} executions entered the backend")


class FileGate:
    """A gate across processes: open while `path` exists; each execution appends a byte to
    `path`.entered as it arrives, so the test sees how many are inside."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entered_path = self.path.with_name(self.path.name + ".entered")

    # test side
    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.entered_path.write_bytes(b"")

    def open(self) -> None:
        self.path.touch()

    def entered(self) -> int:
        return self.entered_path.stat().st_size if self.entered_path.exists() else 0

    def wait_entered(self, n: int, timeout: float = 30.0) -> None:
        t_end = time.monotonic() + timeout  # a failure guard: turns a hang into a clear error
        while self.entered() < n:
            if time.monotonic() > t_end:
                raise AssertionError(f"only {self.entered()} of {n} executions entered the backend")
            time.sleep(0.002)

    # backend side
    def pass_through(self) -> None:
        with open(self.entered_path, "ab") as f:
            f.write(b".")
        while not self.path.exists():
            time.sleep(0.002)


class GatedBackend(Backend):
    kind = "test_gated"

    def __init__(self, inner: Backend, gate: Gate) -> None:
        super().__init__(inner.model_file, inner.options)
        self.inner = inner
        self.gate = gate
        # The gate holds a whole execution, outside any lock the inner backend takes (ONNX Runtime's
        # overlap slot waits on one): one execution at a time unless a test asks for more.
        self.concurrent_executions = 1
        self._inputs = inner.inputs
        self._outputs = inner.outputs

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.pass_through()
        return self.inner.execute(inputs)

    def close(self) -> None:
        self.inner.close()


class FaultyBackend(OrtBackend):
    kind = KIND
    # Faults are injected before ONNX Runtime's run lock: one execution at a time keeps the order the
    # fault tests set up (which request hangs or raises while which is queued).
    concurrent_executions = 1

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        super().__init__(model_file, options)
        params = dict(options.extra)
        self.raise_value = float(params["fault_raise_value"]) if "fault_raise_value" in params else None
        self.hang_value = float(params["fault_hang_value"]) if "fault_hang_value" in params else None
        self.gate = FileGate(Path(params["gate_file"])) if "gate_file" in params else None

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(iter(inputs.values()))
        if self.raise_value is not None and np.any(first == self.raise_value):
            raise RuntimeError(f"injected fault: input contains {self.raise_value}")
        if self.hang_value is not None and np.any(first == self.hang_value):
            threading.Event().wait()
        if self.gate is not None:
            self.gate.pass_through()
        return super().execute(inputs)


register_backend(KIND, FaultyBackend)
