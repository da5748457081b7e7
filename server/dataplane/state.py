"""What the data plane knows about the process: readiness, draining, admission, shared memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from server.dataplane.admission import Admission
from server.repository import ModelRepository
from server.shared_memory import process_registry


class ServerState:
    def __init__(self) -> None:
        self.started = False
        self.shutting_down = False
        self.strict_readiness = False
        self.model_control_mode = "none"  # "explicit": models load and unload on request; "poll": follow the disk
        self.admission = Admission()  # server-wide in-flight limits; the app sets the configured one
        self.shared_memory = process_registry()  # system shared-memory regions, every binding's

    @property
    def inflight(self) -> int:
        """Inference requests accepted and not yet answered (what shutdown drains): admission holds them."""
        return self.admission.requests

    def ready(self, repository: ModelRepository) -> bool:
        if not self.started or self.shutting_down:
            return False
        if self.strict_readiness:
            # As Triton: a model unloaded on purpose does not count against readiness.
            return all(s.state == "READY" or s.reason == "unloaded" for s in repository.models.values())
        return True

    @contextmanager
    def accepted(self, nbytes: int = 0) -> Iterator[None]:
        """Count one inference request (of `nbytes` as received) as in flight for its whole life:
        graceful shutdown waits for it, and admission refuses it first (RESOURCE_EXHAUSTED with a
        retry pushback) when the server already holds its limit of requests or bytes."""
        with self.admission.admit(nbytes):
            yield
