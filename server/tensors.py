"""Protocol tensors <-> numpy: raw bytes, typed values, BYTES with 4-byte length prefixes.

`TensorIn` is one input as any binding received it, nothing decoded yet: raw bytes (gRPC
raw_input_contents, HTTP's binary-data extension) or typed values (gRPC contents.*, JSON `data`).
`decode_tensor` is the one decoder; the request path calls it only after the declaration (name,
datatype, shape) has been checked against the model. Raw contents become arrays without a copy
(np.frombuffer over the request's bytes); the batcher copies once when it concatenates. Outputs always
go back as raw_output_contents, the only form tritonclient's `as_numpy` reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cnncore.datatypes import from_numpy, to_numpy
from cnncore.wire import WireFormatError, deserialize_bytes, element_count, serialize_bytes
from protos import grpc_service_pb2 as pb
from server.errors import invalid

# Which InferTensorContents field holds each datatype when sent typed (FP16/BF16 have none: raw only).
_TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@dataclass(frozen=True)
class TensorIn:
    name: str
    datatype: str  # protocol name, e.g. "FP32"
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    values: Sequence | None = None  # flat, in row-major order; None: neither raw nor typed contents exist
    values_field: str = "data"  # where the values came from, for error messages


def decode_tensor(t: TensorIn) -> np.ndarray:
    """One input as a numpy array shaped as declared; INVALID_ARGUMENT on any inconsistency."""
    name, shape = t.name, t.shape
    if any(d < 0 for d in shape):
        raise invalid(f"input '{name}': shape {list(shape)} has a negative dimension")
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
        raise invalid(f"input '{name}': {t.datatype} must be sent in raw_input_contents")
    values = t.values
    if len(values) != count:
        raise invalid(f"input '{name}': expected {count} elements in {t.values_field} for shape {list(shape)}, "
                      f"got {len(values)}")
    if t.datatype == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        arr[:] = [v if isinstance(v, bytes) else str(v).encode() for v in values]
        return arr.reshape(shape)
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError, TypeError) as exc:
        raise invalid(f"input '{name}': value out of range for {t.datatype}: {exc}") from None


def tensor_in(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | memoryview | None) -> TensorIn:
    """A gRPC input tensor (with its raw_input_contents entry, if any) as the request path takes it."""
    shape = tuple(int(d) for d in tensor.shape)
    if raw is not None:
        return TensorIn(tensor.name, tensor.datatype, shape, raw=raw)
    field = _TYPED_FIELD.get(tensor.datatype)
    if field is None:  # FP16/BF16 have no typed field; an unknown datatype is named by the request path
        return TensorIn(tensor.name, tensor.datatype, shape)
    return TensorIn(tensor.name, tensor.datatype, shape, values=getattr(tensor.contents, field),
                    values_field=f"contents.{field}")


def decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | memoryview | None) -> np.ndarray:
    return decode_tensor(tensor_in(tensor, raw))


def encode_output(name: str, arr: np.ndarray, response: pb.ModelInferResponse) -> None:
    """Append `arr` to `response` as an output tensor with raw contents."""
    out = response.outputs.add()
    out.name = name
    out.datatype = from_numpy(arr.dtype)
    out.shape.extend(arr.shape)
    if out.datatype == "BYTES":
        response.raw_output_contents.append(serialize_bytes(arr))
    else:
        response.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
