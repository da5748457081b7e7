"""The Open Inference Protocol's BYTES tensor encoding, shared by the server and the client.

On the wire a BYTES tensor is its elements back to back, each a little-endian uint32 length followed by
that many bytes (raw_input_contents / raw_output_contents, and Triton's HTTP binary-data extension).
"""

from __future__ import annotations

import math
import struct

import numpy as np


class WireFormatError(ValueError):
    """Bytes that do not decode as the declared tensor; the message names the tensor and the offset."""


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def deserialize_bytes(buf: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """`count` BYTES elements from `buf` as a 1-D object array; WireFormatError on any inconsistency."""
    items: list[bytes] = []
    off, n = 0, len(buf)
    while off < n:
        if len(items) >= count:
            # Stop at the declared count: a buffer with more elements than its shape is refused without
            # decoding the rest of it.
            raise WireFormatError(f"tensor '{name}': expected {count} BYTES elements for its shape, got more")
        if off + 4 > n:
            raise WireFormatError(f"tensor '{name}': truncated BYTES element length at offset {off}")
        (length,) = struct.unpack_from("<I", buf, off)
        off += 4
        if off + length > n:
            raise WireFormatError(
                f"tensor '{name}': BYTES element of {length} bytes overruns the buffer at offset {off}"
            )
        items.append(bytes(buf[off : off + length]))
        off += length
    if len(items) != count:
        raise WireFormatError(f"tensor '{name}': expected {count} BYTES elements for its shape, got {len(items)}")
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
