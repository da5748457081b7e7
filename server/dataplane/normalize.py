"""Normalize: the one place an inference request is checked, whichever binding it came through.

A binding (gRPC ModelInfer / ModelStreamInfer, REST infer) only translates its wire form into
`TensorIn`s and `OutputIn`s and calls `DataPlane.normalize` (server/dataplane/plane.py), which resolves
the model and runs `normalize` here. Every check a request must satisfy runs once, in this order
(cheap checks first, nothing decoded before its declaration is known to fit), as Triton's
`InferenceRequest::Normalize` does:

1. the server is accepting requests (UNAVAILABLE while draining);
2. the model and version resolve (NOT_FOUND / UNAVAILABLE; names are echoed truncated);
   from here on every refusal is counted as the model's INVALID failure, whichever check refused;
3. parameters: every request, input and output parameter is one this server honours, or it is refused
   (server/dataplane/protocol_checks.py: nothing is accepted and ignored); `timeout` is an integer
   (microseconds); the deadline is the earliest of it, the transport's and the model's
   `default_queue_policy.default_timeout_microseconds` (`deadline_from`, the one place a deadline is
   computed; the batcher only enforces it);
4. requested outputs exist, and those to be written into shared memory name a region window that fits;
   those asked for with `classification` carry a positive count (server/dataplane/classification.py,
   applied to the results by `DataPlane.infer` for every binding);
5. inputs: no duplicates; exactly one source of contents each (a shared-memory region, raw bytes or
   typed values), a region resolved to its window; each input's name, datatype and shape (no negative
   dimension, the batch within max_batch_size) checked against the model's config BEFORE its contents
   are decoded, then its byte size; BYTES elements are decoded only up to the count its checked shape
   holds, large ones off the event loop;
6. the decoded set as a whole: all inputs present, one batch size, the backend's own checks.

The vision calls (server/dataplane/vision.py) make their input arrays from pictures and enter at step 6
(`normalize_arrays`), so both APIs share steps 1-3 and 6, the batcher and the statistics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.dataplane.classification import class_counts
from server.dataplane.model import ServedModel
from server.dataplane.protocol_checks import check_infer_parameters
from server.dataplane.tensors import TensorIn, decode_tensor
from server.errors import invalid
from server.shared_memory import OutputTarget, SharedMemoryRegistry, output_target, tensor_source

# BYTES payloads above this are decoded in a worker thread: element-by-element decoding of megabytes
# on the event loop would stall every other request and health check meanwhile.
_OFFLOAD_BYTES = 1 << 20


def deadline_from(
    transport_remaining_s: float | None, timeout_us: int | None, default_timeout_us: int = 0
) -> float | None:
    """Absolute deadline on the event-loop clock: the earliest of the transport's (gRPC deadline, in
    seconds remaining; None or absurdly large = none), the request's `timeout` parameter and the
    model's default timeout (microseconds; 0 = none)."""
    loop = asyncio.get_running_loop()
    deadline = None
    if transport_remaining_s is not None and transport_remaining_s < 1e9:
        deadline = loop.time() + transport_remaining_s
    for us in (timeout_us, default_timeout_us):
        if us is not None and us > 0:
            t = loop.time() + us / 1e6
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


@dataclass(frozen=True)
class OutputIn:
    """A requested output as a binding received it; its parameters may name a shared-memory region."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class InferenceRequest:
    """A request that passed every check: what the model's batcher takes."""

    model: ServedModel
    inputs: dict[str, np.ndarray]
    outputs: list[str]  # the outputs to answer with, in order (all of the model's when none was asked)
    id: str = ""
    deadline: float | None = None
    received_ns: int = field(default_factory=time.perf_counter_ns)
    targets: dict[str, OutputTarget] = field(default_factory=dict)  # outputs written into shared memory
    classes: dict[str, int] = field(default_factory=dict)  # outputs answered as their top classes


def _source(t: TensorIn, shm: SharedMemoryRegistry) -> TensorIn:
    """Step 5's exclusivity: exactly one source of contents; a region becomes its window (raw bytes)."""
    window = tensor_source(shm, t.name, t.parameters) if t.parameters else None
    given = [
        what
        for what, present in (
            ("a shared memory region", window is not None),
            (t.raw_field, t.raw is not None),
            (t.values_field, t.values is not None),
        )
        if present
    ]
    if len(given) > 1:
        raise invalid(f"input '{t.name}': both {' and '.join(given)} given; send its contents one way")
    if not given:
        raise invalid(f"input '{t.name}': neither '{t.values_field}' nor {t.raw_field} given")
    if window is None:
        return t
    return TensorIn(t.name, t.datatype, t.shape, raw=window, raw_field="shared memory region")


def _targets(model: ServedModel, outputs: Sequence[OutputIn], shm: SharedMemoryRegistry) -> dict[str, OutputTarget]:
    targets = {}
    for o in outputs:
        if o.name not in model.output_names:
            raise invalid(
                f"model '{model.name}': requested output '{o.name}' does not exist; outputs are {model.output_names}"
            )
        if o.parameters and (target := output_target(shm, o.name, o.parameters)) is not None:
            targets[o.name] = target
    return targets


async def normalize(
    model: ServedModel,
    inputs: Sequence[TensorIn],
    outputs: Sequence[OutputIn],
    parameters: Mapping[str, Any],
    shm: SharedMemoryRegistry,
    *,
    request_id: str = "",
    transport_remaining_s: float | None = None,
    received_ns: int,
    protocol: str = "grpc",
) -> InferenceRequest:
    """Steps 3-6 for a tensor request on its resolved model; InferError names what is wrong. `protocol`
    ("grpc" or "http") says which wire parameters the binding itself consumed (binary data over REST)."""
    with model.refusals_counted():
        check_infer_parameters(
            protocol, parameters, ((t.name, t.parameters) for t in inputs), ((o.name, o.parameters) for o in outputs)
        )
        deadline = deadline_from(transport_remaining_s, timeout_parameter(parameters), model.default_timeout_us)
        targets = _targets(model, outputs, shm)
        classes = class_counts((o.name, o.parameters) for o in outputs)
        arrays: dict[str, np.ndarray] = {}
        for t in inputs:
            if t.name in arrays:
                raise invalid(f"input '{t.name}' given twice")
            t = _source(t, shm)
            model.check_declared(t.name, t.datatype, t.shape)
            if t.datatype == "BYTES" and t.raw is not None and len(t.raw) > _OFFLOAD_BYTES:
                arrays[t.name] = await asyncio.to_thread(decode_tensor, t)
            else:
                arrays[t.name] = decode_tensor(t)
        model.validate(arrays, declarations_checked=True)
    return InferenceRequest(
        model,
        arrays,
        [o.name for o in outputs] or list(model.output_names),
        request_id,
        deadline,
        received_ns,
        targets,
        classes,
    )


def normalize_arrays(
    model: ServedModel, inputs: dict[str, np.ndarray], *, deadline: float | None, received_ns: int
) -> InferenceRequest:
    """Step 6 for arrays the data plane made itself (the vision calls' pictures, whose deadline the
    call computed once with `deadline_from`): each array against its declaration, then the set."""
    with model.refusals_counted():
        model.validate(inputs)
    return InferenceRequest(model, inputs, list(model.output_names), deadline=deadline, received_ns=received_ns)
