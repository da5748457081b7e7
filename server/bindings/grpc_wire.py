"""The gRPC wire form of tensors: ModelInferRequest decoding without copying the tensor bytes, and
protocol tensors <-> the data plane's `TensorIn` / numpy outputs.

Parsing a ModelInferRequest with protobuf copies every raw_input_contents entry into the message, and
reading `request.raw_input_contents[i]` copies it again into a new bytes object: two copies of a
600 KB image tensor per request on the hottest path. Instead, the gRPC handler receives the serialized
bytes; this module walks the top-level wire format once, hands everything except field 7
(raw_input_contents) to protobuf (a few hundred bytes of names, shapes and parameters), and returns
the raw contents as memoryviews into the received buffer, which numpy then wraps without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnncore.datatypes import from_numpy
from protos import grpc_service_pb2 as pb
from server.dataplane.tensors import TensorIn, decode_tensor, raw_view
from server.shared_memory import REGION

_RAW_INPUT_CONTENTS = 7
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5


class WireError(ValueError):
    """The bytes are not a well-formed ModelInferRequest."""


# Which InferTensorContents field holds each datatype when sent typed (FP16/BF16 have none: raw only).
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass
class WireInferRequest:
    """A ModelInferRequest as received: the protobuf header and the raw contents as views."""

    header: pb.ModelInferRequest  # every field but raw_input_contents
    raw: list[memoryview]  # raw_input_contents, views into the received message


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def parse_infer_request(data: bytes) -> WireInferRequest:
    buf = memoryview(data)
    end = len(buf)
    pos = 0
    header_parts: list[memoryview] = []
    raw: list[memoryview] = []
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise WireError(f"field {field} overruns the message")
            if field == _RAW_INPUT_CONTENTS:
                raw.append(buf[pos : pos + length])
            else:
                header_parts.append(buf[start : pos + length])
            pos += length
        elif wire == _VARINT:
            _, pos = _varint(buf, pos, end)
            header_parts.append(buf[start:pos])
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            if pos > end:
                raise WireError(f"field {field} overruns the message")
            header_parts.append(buf[start:pos])
        else:
            raise WireError(f"unsupported wire type {wire} for field {field}")
    header = pb.ModelInferRequest()
    header.ParseFromString(b"".join(header_parts))
    return WireInferRequest(header, raw)


def from_message(request: pb.ModelInferRequest) -> WireInferRequest:
    """The same view of an already parsed message (streaming path, tests)."""
    raw = [memoryview(r) for r in request.raw_input_contents]
    header = pb.ModelInferRequest()
    header.CopyFrom(request)
    header.ClearField("raw_input_contents")
    return WireInferRequest(header, raw)


def parameters_of(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """Protocol parameters as Python values (what the data plane reads), whichever oneof is set."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def tensor_in(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | memoryview | None,
    parameters: Mapping[str, Any] | None = None,
) -> TensorIn:
    """A gRPC input tensor (with its raw_input_contents entry, if any) as the data plane takes it. Typed
    contents go along when given, or when nothing else is (so a missing tensor is named by its count)."""
    shape = tuple(int(d) for d in tensor.shape)
    params = parameters or {}
    field = _TYPED_FIELD.get(tensor.datatype)
    values = None
    if tensor.HasField("contents"):
        values = getattr(tensor.contents, field) if field else ()
    elif raw is None and REGION not in params and field is not None:
        values = getattr(tensor.contents, field)
    return TensorIn(
        tensor.name,
        tensor.datatype,
        shape,
        raw=raw,
        values=values,
        values_field=f"contents.{field}" if field else "contents",
        raw_field="raw_input_contents",
        parameters=params,
    )


def decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | memoryview | None) -> np.ndarray:
    return decode_tensor(tensor_in(tensor, raw))


def encode_output(name: str, arr: np.ndarray, response: pb.ModelInferResponse) -> None:
    """Append `arr` to `response` as an output tensor with raw contents (the only form tritonclient's
    `as_numpy` reads)."""
    response.outputs.add(name=name, datatype=from_numpy(arr.dtype), shape=arr.shape)
    response.raw_output_contents.append(bytes(raw_view(arr)))
