"""One request path: what every binding turns a request into, and the one place that checks it.

A binding (gRPC ModelInfer / ModelStreamInfer, the vision API, REST next) only translates its wire
form into `TensorIn`s and calls `RequestPath`; everything a request must satisfy is read here, in
this order (cheap checks first, nothing decoded before its declaration is known to fit):

1. the server is accepting requests (UNAVAILABLE while draining);
2. the model and version resolve (NOT_FOUND / UNAVAILABLE; names are echoed truncated);
   from here on every refusal is counted as the model's INVALID failure, whichever check refused;
3. parameters: `timeout` is an integer (microseconds); the deadline is the earlier of it and the
   transport's (`deadline_from`, the one place a deadline is computed);
4. requested outputs exist;
5. inputs: no duplicates; raw and typed contents not mixed; each input's name, datatype and shape are
   checked against the model's config BEFORE its contents are decoded, then its byte size; BYTES
   elements are decoded only up to the count its checked shape holds, large ones off the event loop;
6. the decoded set as a whole: all inputs present, one batch size, the backend's own checks.

`RequestPath.infer` then queues the request on the model's dynamic batcher. The vision API enters at
step 6 with arrays it made from pictures (`infer_arrays`), so both APIs share steps 1-2 and 6 and the
batcher.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from server.admission import Admission
from server.errors import invalid, unavailable
from server.model import ServedModel
from server.repository import ModelRepository
from server.shared_memory import process_registry
from server.tensors import TensorIn, decode_tensor

# BYTES payloads above this are decoded in a worker thread: element-by-element decoding of megabytes
# on the event loop would stall every other request and health check meanwhile.
_OFFLOAD_BYTES = 1 << 20


def deadline_from(transport_remaining_s: float | None, timeout_us: int | None) -> float | None:
    """Absolute deadline on the event-loop clock: the earlier of the transport's (gRPC deadline, in
    seconds remaining; None or absurdly large = none) and the request's `timeout` parameter."""
    loop = asyncio.get_running_loop()
    deadline = None
    if transport_remaining_s is not None and transport_remaining_s < 1e9:
        deadline = loop.time() + transport_remaining_s
    if timeout_us is not None and timeout_us > 0:
        t = loop.time() + timeout_us / 1e6
        deadline = t if deadline is None else min(deadline, t)
    return deadline


def timeout_parameter(parameters: Mapping[str, Any]) -> int | None:
    """The `timeout` request parameter (microseconds) from a binding's parameters as Python values."""
    if "timeout" not in parameters:
        return None
    value = parameters["timeout"]
    if isinstance(value, bool) or not isinstance(value, int):
        kind = type(value).__name__
        raise invalid(f"parameter 'timeout' must be an integer (microseconds), got {kind}")
    return value


@dataclass
class InferenceRequest:
    """A request that passed every check: ready for the model's batcher."""

    model: ServedModel
    inputs: dict[str, np.ndarray]
    outputs: list[str]  # the outputs to answer with, in order (all of the model's when none was asked)
    id: str = ""
    deadline: float | None = None
    received_ns: int = field(default_factory=time.perf_counter_ns)


class ServerState:
    """What every binding must know about the process: readiness, draining, requests in flight."""

    def __init__(self) -> None:
        self.started = False
        self.shutting_down = False
        self.strict_readiness = False
        self.model_control_mode = "none"  # "explicit": models load and unload on request
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


class RequestPath:
    def __init__(self, repository: ModelRepository, state: ServerState) -> None:
        self.repository = repository
        self.state = state

    def resolve(self, name: str, version: str = "") -> ServedModel:
        """Steps 1-2: the served model, or UNAVAILABLE (draining / not ready) / NOT_FOUND."""
        if self.state.shutting_down:
            raise unavailable("server is shutting down; not accepting new requests")
        return self.repository.get(name, version)

    async def normalize(self, name: str, version: str, inputs: Sequence[TensorIn], *,
                        outputs: Sequence[str] = (), parameters: Mapping[str, Any] | None = None,
                        request_id: str = "", transport_remaining_s: float | None = None,
                        received_ns: int | None = None) -> InferenceRequest:
        """Steps 1-6 for a tensor request; InferError names what is wrong."""
        received_ns = received_ns or time.perf_counter_ns()
        model = self.resolve(name, version)
        with model.refusals_counted():
            deadline = deadline_from(transport_remaining_s, timeout_parameter(parameters or {}))
            for o in outputs:
                if o not in model.output_names:
                    raise invalid(f"model '{model.name}': requested output '{o}' does not exist; "
                                  f"outputs are {model.output_names}")
            arrays: dict[str, np.ndarray] = {}
            for t in inputs:
                if t.name in arrays:
                    raise invalid(f"input '{t.name}' given twice")
                model.check_declared(t.name, t.datatype, t.shape)
                if t.datatype == "BYTES" and t.raw is not None and len(t.raw) > _OFFLOAD_BYTES:
                    arrays[t.name] = await asyncio.to_thread(decode_tensor, t)
                else:
                    arrays[t.name] = decode_tensor(t)
            model.validate(arrays, declarations_checked=True)
        return InferenceRequest(model, arrays, list(outputs) or list(model.output_names), request_id,
                                deadline, received_ns)

    async def infer(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        """Queue a normalized request on its model's batcher and await its outputs."""
        return await request.model.batcher.infer(request.inputs, deadline=request.deadline,
                                                 received_ns=request.received_ns)

    async def infer_arrays(self, model: ServedModel, inputs: dict[str, np.ndarray], deadline: float | None,
                           received_ns: int) -> dict[str, np.ndarray]:
        """Step 6 and the batcher for arrays a binding made itself (the vision API's pictures)."""
        return await model.infer(inputs, deadline=deadline, received_ns=received_ns)
