"""Protocol tensors <-> numpy: raw_input_contents, typed contents, BYTES with 4-byte length prefixes.

Raw contents become arrays without a copy (np.frombuffer over the request's bytes); the batcher copies
once when it concatenates. Outputs always go back as raw_output_contents, the only form
tritonclient's `as_numpy` reads.
"""
from __future__ import annotations

import numpy as np

from protos import grpc_service_pb2 as pb
from cnncore.datatypes import from_numpy, to_numpy
from cnncore.wire import WireFormatError, deserialize_bytes, element_count, serialize_bytes
from server.errors import invalid

# Which InferTensorContents field holds each datatype when sent typed (FP16/BF16 have none: raw only).
_TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | memoryview | None) -> np.ndarray:
    """One request input as a numpy array shaped as declared; INVALID_ARGUMENT on any inconsistency."""
    name = tensor.name
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise invalid(f"input '{name}': shape {list(shape)} has a negative dimension")
    try:
        dtype = to_numpy(tensor.datatype)
    except ValueError as exc:
        raise invalid(f"input '{name}': {exc}") from None
    count = element_count(shape)
    if raw is not None:
        if tensor.datatype == "BYTES":
            try:
                return deserialize_bytes(raw, count, name).reshape(shape)
            except WireFormatError as exc:
                raise invalid(f"input {str(exc).removeprefix('tensor ')}") from None
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise invalid(
                f"input '{name}': expected {expected} bytes for {tensor.datatype} {list(shape)}, got {len(raw)} bytes"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = _TYPED_FIELD.get(tensor.datatype)
    if field is None:
        raise invalid(f"input '{name}': {tensor.datatype} must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise invalid(f"input '{name}': expected {count} elements in contents.{field} for shape {list(shape)}, "
                      f"got {len(values)}")
    if tensor.datatype == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        arr[:] = list(values)
        return arr.reshape(shape)
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except OverflowError as exc:
        raise invalid(f"input '{name}': value out of range for {tensor.datatype}: {exc}") from None


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
