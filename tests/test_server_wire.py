"""Zero-copy ModelInferRequest decoding agrees with protobuf, and tensor codecs round-trip exactly."""

from __future__ import annotations

import numpy as np
import pytest

from cnncore.wire import WireFormatError, deserialize_bytes, serialize_bytes
from protos import grpc_service_pb2 as pb
from server.bindings.grpc_wire import WireError, decode_input, from_message, parse_infer_request
from server.errors import InferError


def _request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m", model_version="3", id="req-1")
    req.parameters["timeout"].int64_param = 1500
    req.parameters["tag"].string_param = "x" * 300  # a length that needs a two-byte varint
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.array([[1, -2]], dtype=np.int64)
    req.inputs.add(name="a", datatype="FP32", shape=a.shape)
    req.inputs.add(name="b", datatype="INT64", shape=b.shape)
    req.outputs.add(name="y")
    req.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    return req


def test_parse_matches_protobuf() -> None:
    req = _request()
    data = req.SerializeToString()
    parsed = parse_infer_request(data)
    expected = pb.ModelInferRequest()
    expected.CopyFrom(req)
    expected.ClearField("raw_input_contents")
    assert parsed.header == expected
    assert [bytes(r) for r in parsed.raw] == list(req.raw_input_contents)
    # Views into the received buffer, not copies.
    assert all(r.obj is data for r in parsed.raw)
    a = decode_input(parsed.header.inputs[0], parsed.raw[0])
    np.testing.assert_array_equal(a, np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    other = from_message(req)
    assert other.header == parsed.header and [bytes(r) for r in other.raw] == [bytes(r) for r in parsed.raw]


def test_large_raw_contents_and_interleaved_fields() -> None:
    big = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=big.shape)
    req.raw_input_contents.append(big.tobytes())
    # Field order on the wire is free: put raw contents first, then the header fields.
    data = (
        pb.ModelInferRequest(raw_input_contents=[big.tobytes()]).SerializeToString()
        + pb.ModelInferRequest(model_name="m", inputs=req.inputs).SerializeToString()
    )
    parsed = parse_infer_request(data)
    assert parsed.header.model_name == "m" and len(parsed.raw) == 1
    np.testing.assert_array_equal(decode_input(parsed.header.inputs[0], parsed.raw[0]), big)


@pytest.mark.parametrize("data", [b"\x3a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x3a", b"\x0b", b"\xff" * 11])
def test_malformed_bytes_raise(data: bytes) -> None:
    with pytest.raises(WireError):
        parse_infer_request(data)


def test_bytes_tensor_codec_roundtrip() -> None:
    items = np.array([b"", b"abc", bytes(range(256))], dtype=np.object_)
    wire = serialize_bytes(items)
    assert wire[:4] == b"\0\0\0\0" and wire[4:8] == b"\3\0\0\0"
    back = deserialize_bytes(memoryview(wire), 3, "s")
    assert list(back) == list(items)
    with pytest.raises(WireFormatError, match="expected 2 BYTES elements"):
        deserialize_bytes(wire, 2, "s")
    with pytest.raises(WireFormatError, match="truncated"):
        deserialize_bytes(wire + b"\1\0", 4, "s")


@pytest.mark.parametrize(
    "datatype, field, values, dtype",
    [
        ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
        ("INT32", "int_contents", [7, -8], np.int32),
        ("UINT8", "uint_contents", [0, 255], np.uint8),
        ("INT64", "int64_contents", [2**40, -1], np.int64),
        ("BOOL", "bool_contents", [True, False], np.bool_),
        ("FP64", "fp64_contents", [0.1, 0.2], np.float64),
    ],
)
def test_typed_contents(datatype: str, field: str, values: list, dtype) -> None:
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[1, 2])
    getattr(t.contents, field).extend(values)
    arr = decode_input(t, None)
    assert arr.dtype == dtype and arr.shape == (1, 2)
    np.testing.assert_array_equal(arr, np.asarray(values, dtype=dtype).reshape(1, 2))


def test_typed_contents_errors() -> None:
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP16", shape=[2])
    with pytest.raises(InferError, match="FP16 must be sent in raw_input_contents"):
        decode_input(t, None)
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[3])
    t.contents.fp32_contents.extend([1.0])
    with pytest.raises(InferError, match="expected 3 elements in contents.fp32_contents"):
        decode_input(t, None)
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="UINT8", shape=[1])
    t.contents.uint_contents.extend([300])
    with pytest.raises(InferError, match="out of range"):
        decode_input(t, None)
