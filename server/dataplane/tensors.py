"""Tensors as the data plane takes and gives them: `TensorIn` (nothing decoded yet) in, numpy out.

`TensorIn` is one input as any binding received it: raw bytes (gRPC raw_input_contents, HTTP's
binary-data extension), typed values (gRPC contents.*, JSON `data`), or parameters naming a system
shared-memory region. The data plane checks that exactly one of them is given and resolves the region
(server/dataplane/normalize.py); `decode_tensor` is the one decoder, called only after the input's
declaration (name, datatype, shape) has been checked against the model. Raw contents become arrays
without a copy (np.frombuffer over the request's bytes); the batcher copies once when it concatenates.
`raw_view` is the one array -> raw-bytes encoding every binding answers with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnncore.datatypes import from_numpy, to_numpy
from cnncore.wire import WireFormatError, deserialize_bytes, element_count, serialize_bytes
from server.errors import invalid


@dataclass(frozen=True)
class TensorIn:
    name: str
    datatype: str  # protocol name, e.g. "FP32"
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    values: Sequence[Any] | None = None  # flat, in row-major order
    values_field: str = "data"  # what the binding calls the typed values, for error messages
    raw_field: str = "raw contents"  # what the binding calls the raw bytes, for error messages
    parameters: Mapping[str, Any] = field(default_factory=dict)  # may name a shared-memory region


def decode_tensor(t: TensorIn) -> np.ndarray:
    """One input as a numpy array shaped as declared; INVALID_ARGUMENT on any inconsistency. The shape's
    dimensions are the model's to check (ServedModel.check_declared, before this runs)."""
    name, shape = t.name, t.shape
    try:
        dtype = to_numpy(t.datatype)
    except ValueError as exc:
        raise invalid(f"input '{name}': {exc}") from None
    count = element_count(shape)
    if t.raw is not None:
        if t.datatype == "BYTES":
            try:
                return deserialize_bytes(t.raw, count, name).reshape(shape)
            except WireFormatError as exc:
                raise invalid(f"input {str(exc).removeprefix('tensor ')}") from None
        expected = count * dtype.itemsize
        if len(t.raw) != expected:
            raise invalid(
                f"input '{name}': expected {expected} bytes for {t.datatype} {list(shape)}, got {len(t.raw)} bytes"
            )
        return np.frombuffer(t.raw, dtype=dtype).reshape(shape)
    if t.values is None:
        raise invalid(f"input '{name}': {t.datatype} must be sent in {t.raw_field}")
    values = t.values
    if len(values) != count:
        raise invalid(
            f"input '{name}': expected {count} elements in {t.values_field} for shape {list(shape)}, got {len(values)}"
        )
    if t.datatype == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        arr[:] = [v if isinstance(v, bytes) else str(v).encode() for v in values]
        return arr.reshape(shape)
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError, TypeError) as exc:
        raise invalid(f"input '{name}': value out of range for {t.datatype}: {exc}") from None


def raw_view(arr: np.ndarray) -> bytes | memoryview:
    """An output's raw bytes as the protocol sends them: BYTES length-prefixed, everything else the
    array's own memory in row-major order (a view, no copy, where the array is contiguous)."""
    if from_numpy(arr.dtype) == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data  # a memoryview (numpy's Buffer needs 3.12 stubs)
