"""Every parameter an inference request may carry: honoured, or refused INVALID_ARGUMENT naming it.

Nothing is accepted and ignored. What each place takes (README, "Protocol support", says the same):

    request   timeout (µs, honoured); priority (0 only: no model here has priority levels);
              sequence_id / sequence_start / sequence_end (absent, 0 or false only: no sequence batching);
              binary_data_output (REST: honoured; gRPC: outputs are always binary, so a no-op by nature)
              triton_enable_empty_final_response (Triton's clients and perf_analyzer send it: no model
              here is decoupled, every request has one response and it is the final one)
    input     shared_memory_region / _byte_size / _offset (both); binary_data_size (REST only)
    output    shared_memory_region / _byte_size / _offset (both); classification (both);
              binary_data (REST only)

Custom parameters (Triton's `parameters` extension passes them to the backend) are refused: no backend
here reads any. Normalize (server/dataplane/normalize.py, step 3) runs `check_infer_parameters` for every
binding. The REST JSON objects are checked the same way by the REST binding: unknown keys are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from server.dataplane.classification import CLASSIFICATION
from server.errors import echo, invalid
from server.shared_memory import BYTE_SIZE, OFFSET, REGION

SHARED_MEMORY = {REGION, BYTE_SIZE, OFFSET}
REQUEST = {
    "timeout",
    "priority",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "binary_data_output",
    "triton_enable_empty_final_response",
}
INPUT = {"grpc": SHARED_MEMORY, "http": SHARED_MEMORY | {"binary_data_size"}}
OUTPUT = {"grpc": SHARED_MEMORY | {CLASSIFICATION}, "http": SHARED_MEMORY | {CLASSIFICATION, "binary_data"}}
# REST JSON: the keys each object may have.
JSON_KEYS = {
    "request": {"id", "parameters", "inputs", "outputs"},
    "input": {"name", "shape", "datatype", "parameters", "data"},
    "output": {"name", "parameters"},
    "repository index request": {"ready"},
    "register request": {"key", "offset", "byte_size"},
}
_UNSET = (None, 0, False, "")


def _unknown(where: str, key: str, allowed: set[str]) -> None:
    raise invalid(
        f"{where}: unknown parameter {echo(key)}; accepted here: {', '.join(sorted(allowed))} "
        "(custom parameters are not taken: no backend of this server reads any)"
    )


def check_request_parameters(params: Mapping[str, Any]) -> None:
    for key, value in params.items():
        if key not in REQUEST:
            _unknown("inference request", key, REQUEST)
        if key == "priority" and value not in _UNSET:
            raise invalid(
                f"inference request: parameter 'priority' {value!r:.40} is not supported: no model "
                "here has priority levels (send 0 or leave it out)"
            )
        if key.startswith("sequence_") and value not in _UNSET:
            raise invalid(
                f"inference request: parameter '{key}' {value!r:.40} is not supported: models here "
                "are stateless (no sequence batching)"
            )


def _check_tensors(kind: str, tensors: Iterable[tuple[str, Mapping[str, Any]]], allowed: set[str]) -> None:
    for name, params in tensors:
        for key in params:
            if key not in allowed:
                _unknown(f"{kind} {echo(name)}", key, allowed)


def check_infer_parameters(
    protocol: str,
    request: Mapping[str, Any],
    inputs: Iterable[tuple[str, Mapping[str, Any]]],
    outputs: Iterable[tuple[str, Mapping[str, Any]]],
) -> None:
    """The parameters of a whole inference request (`protocol` "grpc" or "http")."""
    check_request_parameters(request)
    _check_tensors("input", inputs, INPUT[protocol])
    _check_tensors("output", outputs, OUTPUT[protocol])


def check_json_keys(doc: Mapping[str, Any], what: str) -> None:
    """A REST body's keys (`what`: a JSON_KEYS entry): an unknown one is refused, never ignored."""
    unknown = sorted(set(doc) - JSON_KEYS[what])
    if unknown:
        raise invalid(f"{what}: unknown field {echo(unknown[0])}; fields are {', '.join(sorted(JSON_KEYS[what]))}")


def check_json_request(doc: Mapping[str, Any]) -> None:
    """A REST inference request's JSON keys, and those of its inputs and outputs (values are checked where
    they are read; the parameters by Normalize, as every binding's)."""
    for key in doc:
        if key not in JSON_KEYS["request"]:
            raise invalid(
                f"inference request: unknown field {echo(key)}; fields are {', '.join(sorted(JSON_KEYS['request']))}"
            )
    for kind, field in (("input", "inputs"), ("output", "outputs")):
        items = doc.get(field)
        for t in items if isinstance(items, list) else ():
            if not isinstance(t, dict):
                continue  # refused, with its index, where the tensors are read
            for key in t:
                if key not in JSON_KEYS[kind]:
                    raise invalid(
                        f"{kind} {echo(t.get('name', ''))}: unknown field {echo(key)}; fields are "
                        f"{', '.join(sorted(JSON_KEYS[kind]))}"
                    )
