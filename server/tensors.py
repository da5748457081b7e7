"""Protocol tensors <-> numpy: raw_input_contents, typed contents, BYTES with 4-byte length prefixes.

Raw contents become arrays without a copy (np.frombuffer over the request's bytes); the batcher copies
once when it concatenates. Outputs always go back as raw_output_contents, the only form
tritonclient's `as_numpy` reads.
"""
from __future__ import annotations

import math
import struct

import numpy as np

from protos import grpc_service_pb2 as pb
from server.datatypes import from_numpy, to_numpy
from server.errors import invalid

# Which InferTensorContents field holds each datatype when sent typed (FP16/BF16 have none: raw only).
_TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def deserialize_bytes(buf: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """BYTES wire form: each element is a little-endian uint32 length followed by that many bytes."""
    items = []
    off, n = 0, len(buf)
    while off < n:
        if off + 4 > n:
            raise invalid(f"input '{name}': truncated BYTES element length at offset {off}")
        (length,) = struct.unpack_from("<I", buf, off)
        off += 4
        if off + length > n:
            raise invalid(f"input '{name}': BYTES element of {length} bytes overruns the buffer at offset {off}")
        items.append(bytes(buf[off:off + length]))
        off += length
    if len(items) != count:
        raise invalid(f"input '{name}': expected {count} BYTES elements for its shape, got {len(items)}")
    arr = np.empty(count, dtype=np.object_)
    arr[:] = items
    return arr


def serialize_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


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
            return deserialize_bytes(raw, count, name).reshape(shape)
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
