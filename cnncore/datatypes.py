"""The three names of every tensor element type: protocol string, config enum, numpy dtype.

The Open Inference Protocol spells types as strings ("FP32"), config.pbtxt as an enum (TYPE_FP32),
ONNX Runtime as "tensor(float)". One table keeps them in step.
"""

from __future__ import annotations

import numpy as np

from protos import model_config_pb2 as mc

# protocol datatype -> (config enum, numpy dtype). BYTES is object (np.bytes_ items) on the numpy side.
_TABLE: dict[str, tuple[int, np.dtype]] = {
    "BOOL": (mc.TYPE_BOOL, np.dtype(np.bool_)),
    "UINT8": (mc.TYPE_UINT8, np.dtype(np.uint8)),
    "UINT16": (mc.TYPE_UINT16, np.dtype(np.uint16)),
    "UINT32": (mc.TYPE_UINT32, np.dtype(np.uint32)),
    "UINT64": (mc.TYPE_UINT64, np.dtype(np.uint64)),
    "INT8": (mc.TYPE_INT8, np.dtype(np.int8)),
    "INT16": (mc.TYPE_INT16, np.dtype(np.int16)),
    "INT32": (mc.TYPE_INT32, np.dtype(np.int32)),
    "INT64": (mc.TYPE_INT64, np.dtype(np.int64)),
    "FP16": (mc.TYPE_FP16, np.dtype(np.float16)),
    "FP32": (mc.TYPE_FP32, np.dtype(np.float32)),
    "FP64": (mc.TYPE_FP64, np.dtype(np.float64)),
    "BYTES": (mc.TYPE_STRING, np.dtype(np.object_)),
}
_BY_ENUM = {enum: name for name, (enum, _) in _TABLE.items()}
_BY_NUMPY = {dt: name for name, (_, dt) in _TABLE.items()}

# ONNX Runtime's type strings for the same element types.
_ORT = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

PROTOCOL_DATATYPES = tuple(_TABLE)


def to_numpy(datatype: str) -> np.dtype:
    try:
        return _TABLE[datatype][1]
    except KeyError:
        raise ValueError(f"unsupported datatype {datatype!r}; supported: {', '.join(_TABLE)}") from None


def from_numpy(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in "SU":  # fixed-width strings travel as BYTES
        return "BYTES"
    try:
        return _BY_NUMPY[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no protocol datatype") from None


def from_config(enum_value: int) -> str:
    """Config enum (TYPE_FP32) -> protocol string (FP32)."""
    try:
        return _BY_ENUM[enum_value]
    except KeyError:
        raise ValueError(f"config data_type {mc.DataType.Name(enum_value)} is not supported") from None


def to_config(datatype: str) -> int:
    return _TABLE[datatype][0]


def from_ort(type_str: str) -> str:
    try:
        return _ORT[type_str]
    except KeyError:
        raise ValueError(f"ONNX Runtime type {type_str} is not supported") from None
