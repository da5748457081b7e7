"""The data plane: what the server does, whichever binding a call came through.

Every binding (server/bindings/) translates its wire form into these calls and their plain results
(Python values, numpy arrays, dataclasses; never a protocol message) back into its wire form. Here:
readiness and draining, model resolution, the one Normalize (server/dataplane/normalize.py), admission,
shared-memory regions, the repository calls, and the vision calls with their one worker pool. Failures
are `InferError`s (server/errors.py), which each binding maps to its status once.

    plane = DataPlane(repository, state, vision_threads=4)
    with plane.admitted(len(body)):                          # server-wide admission (RESOURCE_EXHAUSTED)
        request = await plane.normalize("resnet", "", [TensorIn(...)], outputs=[OutputIn("logits")])
        response = await plane.infer(request)                 # the model's batcher, then shared memory
    answer = await plane.vision.classify("resnet", "", [png_bytes], top_k=3)
    plane.close()                                             # with the server: the vision pool
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from server.dataplane.classification import classify
from server.dataplane.model import ServedModel
from server.dataplane.normalize import InferenceRequest, OutputIn, normalize
from server.dataplane.state import ServerState
from server.dataplane.tensors import TensorIn, raw_view
from server.dataplane.vision import DEFAULT_VISION_THREADS, VisionCalls
from server.errors import InferError, echo, invalid, not_found, unavailable
from server.model_overrides import LoadOverride
from server.repository import ModelRepository, ModelState
from server.shared_memory import RegionStatus
from server.tracing import TRACER, Trace

SERVER_NAME = "cnnserve"
SERVER_VERSION = "0.1.0"
# The protocol extensions this server implements (what server metadata advertises to clients).
EXTENSIONS = [
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "system_shared_memory",
    "binary_tensor_data",
    "logging",
    "trace",
]
# not "parameters": custom ones are refused


@dataclass(frozen=True)
class OutputTensor:
    name: str
    array: np.ndarray
    region: str | None = None  # written into this shared-memory region instead of the answer
    written: int = 0  # bytes written into the region


@dataclass(frozen=True)
class InferenceResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


@dataclass(frozen=True)
class IndexEntry:
    """One line of the repository index: a model (version) on disk or loaded, and its state."""

    name: str
    version: str = ""
    state: str = ""
    reason: str = ""


class DataPlane:
    def __init__(
        self, repository: ModelRepository, state: ServerState, vision_threads: int = DEFAULT_VISION_THREADS
    ) -> None:
        self.repository = repository
        self.state = state
        self.vision = VisionCalls(self.resolve, self._execute, threads=vision_threads)

    def close(self) -> None:
        """Release what the data plane owns (the vision worker pool); after every binding stopped."""
        self.vision.close()

    # -- health and metadata ------------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.state.ready(self.repository)

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.repository.get(name, version)
        except InferError:  # unknown, a bad version, not loaded: "not ready"
            return False
        return not self.state.shutting_down

    def model(self, name: str, version: str = "") -> ServedModel:
        """A served model for its metadata, configuration or statistics (served while draining too)."""
        return self.repository.get(name, version)

    def versions(self, model: ServedModel) -> list[int]:
        return sorted(self.repository.models[model.name].versions)

    def statistics(self, name: str = "", version: str = "") -> list[ServedModel]:
        """The models whose statistics were asked for: one, or every served one when `name` is empty."""
        return [self.repository.get(name, version)] if name else list(self.repository.served())

    # -- inference ----------------------------------------------------------------------------------------
    @contextmanager
    def admitted(self, nbytes: int) -> Iterator[None]:
        """Hold one inference request (of `nbytes` as received) for the `with` block: admission refuses
        it at once when the server is at its limits, and graceful shutdown waits for it."""
        with self.state.accepted(nbytes):
            yield

    def resolve(self, name: str, version: str = "") -> ServedModel:
        """Normalize's steps 1-2: the served model, or UNAVAILABLE (draining / not ready) / NOT_FOUND."""
        if self.state.shutting_down:
            raise unavailable("server is shutting down; not accepting new requests")
        return self.repository.get(name, version)

    async def normalize(
        self,
        name: str,
        version: str,
        inputs: Sequence[TensorIn],
        *,
        outputs: Sequence[OutputIn] = (),
        parameters: Mapping[str, Any] | None = None,
        request_id: str = "",
        transport_remaining_s: float | None = None,
        received_ns: int | None = None,
        protocol: str = "grpc",
    ) -> InferenceRequest:
        """Every check of a tensor request, once, in Normalize's order; InferError names what is wrong.
        `protocol`: "grpc" or "http", whose own wire parameters (binary data) the binding consumed."""
        received_ns = received_ns or time.perf_counter_ns()
        model = self.resolve(name, version)
        return await normalize(
            model,
            inputs,
            outputs,
            parameters or {},
            self.state.shared_memory,
            request_id=request_id,
            transport_remaining_s=transport_remaining_s,
            received_ns=received_ns,
            protocol=protocol,
        )

    async def _execute(self, request: InferenceRequest, trace: Trace | None = None) -> dict[str, np.ndarray]:
        return await request.model.batcher.infer(
            request.inputs, deadline=request.deadline, received_ns=request.received_ns, trace=trace
        )

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Queue a normalized request on its model's batcher (traced when sampled: server/tracing.py);
        the outputs asked for, in order, those asked for in shared memory written there, those asked for
        with `classification` as their top classes (Triton's classification extension)."""
        model = request.model
        with TRACER.request(model.name, model.version, request.id, request.received_ns) as trace:
            results = classify(model, await self._execute(request, trace), request.classes)
        outputs = []
        for name in request.outputs:
            target = request.targets.get(name)
            if target is None:
                outputs.append(OutputTensor(name, results[name]))
            else:
                outputs.append(
                    OutputTensor(name, results[name], target.region.name, target.write(raw_view(results[name])))
                )
        return InferenceResponse(model.name, str(model.version), request.id, outputs)

    # -- repository -----------------------------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        out = []
        names = set(self.repository.models) | set(self.repository.names_on_disk())
        for name in sorted(names):
            st: ModelState | None = self.repository.models.get(name)
            if st is None:
                if not ready_only:
                    out.append(IndexEntry(name, state="UNAVAILABLE", reason="not loaded"))
                continue
            if ready_only and st.state != "READY":
                continue
            if st.versions:
                out += [IndexEntry(name, str(v), st.state, st.reason) for v in sorted(st.versions)]
            else:
                out.append(IndexEntry(name, state=st.state, reason=st.reason))
        return out

    def _check_model_control(self) -> None:
        # Triton's answer (status and wording) in modes that do not take load/unload requests.
        if self.state.model_control_mode != "explicit":
            raise unavailable(
                "explicit model load / unload is not allowed in model-control-mode "
                f"{self.state.model_control_mode}; start the server with "
                "--model-control-mode explicit to load and unload models on request"
            )

    async def load(self, name: str, override: LoadOverride | None = None) -> None:
        """(Re)load `name`, from the repository or from the request's `override` (server/model_overrides.py)."""
        self._check_model_control()
        if self.state.shutting_down:
            raise unavailable("server is shutting down")
        state = await self.repository.load(name, override)
        if not state.versions:
            raise invalid(f"failed to load {echo(name)}: {state.reason}")
        if state.reason:  # a reload failed; the previously loaded copy keeps serving
            raise invalid(f"failed to reload {echo(name)} (previous copy still serving): {state.reason}")

    async def unload(self, name: str) -> None:
        self._check_model_control()
        await self.repository.unload(name)

    # -- system shared memory (server/shared_memory.py) ------------------------------------------------------
    def register_region(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.state.shared_memory.register(name, key, offset, byte_size)

    def unregister_region(self, name: str = "") -> None:
        self.state.shared_memory.unregister(name)

    def region_status(self, name: str = "") -> list[RegionStatus]:
        return self.state.shared_memory.status(name)

    # -- CUDA shared memory: answered alike on every binding, though no region can exist here -----------------
    # Status lists none and unregister (a client's cleanup, e.g. perf_analyzer's on exit) succeeds, as a
    # Triton with no region registered answers; register is refused UNIMPLEMENTED (501 over REST).
    def cuda_region_status(self, name: str = "") -> list[RegionStatus]:
        if name:
            raise not_found(f"CUDA shared memory region {echo(name)} is not registered")
        return []

    def cuda_register_region(self, name: str) -> None:
        raise InferError(
            grpc.StatusCode.UNIMPLEMENTED,
            "CUDA shared memory is not supported by this server; use system shared memory",
        )

    def cuda_unregister_region(self, name: str = "") -> None:
        return None
