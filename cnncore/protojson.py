"""Protobuf messages as JSON-ready dicts, the way people read them: numbers as numbers (protobuf's own
JSON mapping writes int64 as strings), fields in declaration order, float32 in its shortest round-trip
form (160.79, not 160.78993225097656), enums by name, unset sub-messages left out.

One converter for what the CLI prints and what the REST binding answers, so both show the same JSON
for the same message. `bytes_as`: "omit" (the CLI writes bytes to files) or "base64" (REST).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

if TYPE_CHECKING:  # the C (upb) implementation's descriptors, which DESCRIPTOR may be
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

BytesAs = Literal["omit", "base64"]


def short_float(value: float) -> float:
    return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))


def _scalar(field: FieldDescriptor | UpbFieldDescriptor, value: Any, bytes_as: BytesAs) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_dict(value, bytes_as=bytes_as)
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None  # set on every TYPE_ENUM field
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return short_float(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def message_to_dict(message: Message, *, bytes_as: BytesAs = "omit") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_BYTES and bytes_as == "omit":
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _scalar(value_field, v, bytes_as) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, v, bytes_as) for v in value]
        elif field.type != FieldDescriptor.TYPE_MESSAGE or message.HasField(field.name):
            out[field.name] = _scalar(field, value, bytes_as)
    return out
