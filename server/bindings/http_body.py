"""What a REST request body may be: decoded with a bound, parsed as standard JSON, its tensor values checked.

The REST server (server/bindings/rest.py) reads bodies with aiohttp's automatic decompression off, so that a
body's Content-Encoding is decoded here, where it can be bounded and kept off the event loop:
- gzip / x-gzip, deflate (zlib or raw) and br are taken; identity is no encoding; anything else is 415;
- a body is inflated in a worker thread (zlib and brotli release the GIL) and never past
  --http-max-input-size bytes of output: a 254 KB gzip bomb of 256 MiB costs the cap, answers 413 and
  leaves the loop answering other requests meanwhile;
- a body that is not what its encoding says (garbage, truncated, trailing bytes) is 400.
JSON is RFC 8259's: the NaN / Infinity / -Infinity tokens Python's json module accepts by default are
refused. Tensor `data` must hold the declared datatype's JSON type (numbers for FP*, integers in the
datatype's range for INT*/UINT*, true/false for BOOL, strings for BYTES): numpy would otherwise turn
null into NaN, "1" into 1.0, 1.5 into 1 and 1e999 into inf without a word.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.errors import InferError, echo, invalid

try:  # aiohttp's optional brotli; without it `br` is answered 415 like any encoding not taken
    import brotli
except ImportError:  # pragma: no cover - brotli ships with the aiohttp speedups in the image
    brotli = None

FLATE = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib wbits: 31 = gzip framing, 15 = zlib framing
TAKEN_ENCODINGS = (*FLATE, *(("br",) if brotli is not None else ()))
UTF8_CHARSETS = {"utf-8", "utf8", "us-ascii", "ascii"}
# What aiohttp's multipart parser raises for a body it cannot read (bad boundary, header, part charset).
FORM_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, HttpProcessingError)

_INT_RANGE = {
    dt: (int(np.iinfo(dt.lower()).min), int(np.iinfo(dt.lower()).max))
    for dt in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
}
_FLOAT_MAX = {
    dt: float(np.finfo(t).max) for dt, t in (("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64))
}
_JSON_KIND: dict[str, tuple[frozenset[type], str]] = {
    "BOOL": (frozenset({bool}), "true or false"),
    "BYTES": (frozenset({str}), "strings"),
    **{dt: (frozenset({int}), "integers") for dt in _INT_RANGE},
    **{dt: (frozenset({int, float}), "numbers") for dt in _FLOAT_MAX},
}
UINT64_LIMIT = 1 << 64


# Refusals only HTTP has a status for: InferErrors with the nearest gRPC code and that status, answered by
# the REST server's one error middleware like every other InferError.
def too_large(message: str) -> InferError:
    """413: HTTP's own status for a body over the limit (RESOURCE_EXHAUSTED had it come over gRPC)."""
    return InferError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, http_status=413)


def too_slow(message: str) -> InferError:
    """408: HTTP's own status for a body that did not arrive in time."""
    return InferError(grpc.StatusCode.DEADLINE_EXCEEDED, message, http_status=408)


def not_taken(message: str) -> InferError:
    """415: a body in an encoding or charset the server does not take."""
    return InferError(grpc.StatusCode.INVALID_ARGUMENT, message, http_status=415)


# -- content encoding --------------------------------------------------------------------------------------
def content_codings(values: Iterable[str]) -> list[str]:
    """The codings of Content-Encoding header values, in the order they were applied; identity dropped."""
    codings = [c.strip().lower() for v in values for c in v.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    for c in codings:
        if c not in TAKEN_ENCODINGS:
            raise not_taken(
                f"Content-Encoding {echo(c, 40)} is not taken; request bodies may be "
                f"{', '.join(TAKEN_ENCODINGS)} or identity"
            )
    return codings


def _too_large(cap: int, coding: str) -> InferError:
    return too_large(f"request body decoded from {coding} exceeds the limit of {cap} bytes (--http-max-input-size)")


def _inflate_flate(data: bytes, coding: str, cap: int) -> bytes:
    wbits = FLATE[coding]
    if coding == "deflate" and data and data[0] & 0x0F != 8:
        wbits = -15  # raw deflate without the zlib header, which some clients send as "deflate"
    out: list[bytes] = []
    size = 0
    try:
        while True:  # gzip allows several members one after another
            d = zlib.decompressobj(wbits)
            chunk = d.decompress(data, cap - size + 1)  # at most one byte past the cap is ever inflated
            size += len(chunk)
            out.append(chunk)
            if size > cap:
                raise _too_large(cap, coding)
            if not d.eof:
                raise invalid(f"request body is not complete {coding} data (the stream ends early)")
            data = d.unused_data
            if not data:
                return b"".join(out)
            if wbits != 31:
                raise invalid(f"request body has {len(data)} bytes after the end of its {coding} data")
    except zlib.error as exc:
        raise invalid(f"request body is not valid {coding} data: {exc}") from None


def _inflate_brotli(data: bytes, cap: int) -> bytes:
    d = brotli.Decompressor()
    try:
        out: bytes = d.process(data, output_buffer_limit=cap + 1)
    except brotli.error as exc:
        raise invalid(f"request body is not valid br data: {exc}") from None
    if len(out) > cap:
        raise _too_large(cap, "br")
    if not d.is_finished():
        raise invalid("request body is not complete br data (the stream ends early)")
    return out


def inflate(data: bytes, codings: Sequence[str], cap: int) -> bytes:
    """`data` with its content codings undone, last applied first; 413 past `cap` bytes of output."""
    for coding in reversed(codings):
        data = _inflate_brotli(data, cap) if coding == "br" else _inflate_flate(data, coding, cap)
    return data


def _check_charset(request: web.Request) -> None:
    charset = request.charset
    if charset and charset.lower() not in UTF8_CHARSETS:
        raise not_taken(
            f"Content-Type charset {echo(charset, 40)} is not taken; request bodies are UTF-8 (JSON) or binary"
        )


async def decode_body(request: web.Request, body: bytes, cap: int) -> bytes:
    """The request's body as sent before its Content-Encoding, inflated in a worker thread under `cap`."""
    _check_charset(request)
    codings = content_codings(request.headers.getall("Content-Encoding", []))
    if not codings or not body:
        return body
    return await asyncio.to_thread(inflate, body, codings, cap)


def refuse_encoded_form(request: web.Request) -> None:
    """A multipart form is parsed as it streams in, before any decoding here could bound it: its parts
    may carry their own Content-Encoding, the whole body may not."""
    if content_codings(request.headers.getall("Content-Encoding", [])):
        raise not_taken("a multipart/form-data body cannot have a Content-Encoding; encode its parts")


# -- JSON ----------------------------------------------------------------------------------------------------
def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON value (RFC 8259 has no NaN or infinities)")


def loads(data: bytes) -> Any:
    """Standard JSON only: json.loads without the NaN / Infinity / -Infinity extension."""
    return json.loads(data, parse_constant=_refuse_constant)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    kind = {str: "a string", list: "a list", dict: "an object", float: "a number", int: "an integer"}
    return f"{kind.get(type(value), type(value).__name__)} ({echo(value, 40)})"


def tensor_values(values: list[Any], datatype: str, where: str) -> list[Any]:
    """JSON `data` of an input (flat) checked against its declared datatype; INVALID_ARGUMENT naming the
    input and the index of the first value that does not fit. An unknown datatype is left to the
    request path, which names it."""
    kind = _JSON_KIND.get(datatype)
    if kind is None or not values:
        return values
    types, expected = kind
    if not set(map(type, values)) <= types:
        i, v = next((i, v) for i, v in enumerate(values) if type(v) not in types)
        raise invalid(f"{where}: data[{i}] is {_describe(v)}; {datatype} data must be {expected}")
    if datatype in _INT_RANGE:
        lo, hi = _INT_RANGE[datatype]
        if min(values) < lo or max(values) > hi:
            i = next(i for i, v in enumerate(values) if not lo <= v <= hi)
            raise invalid(f"{where}: data[{i}] = {echo(values[i], 40)} is out of range for {datatype} [{lo}, {hi}]")
    elif datatype in _FLOAT_MAX:
        limit = _FLOAT_MAX[datatype]
        try:
            fits = np.abs(np.asarray(values, dtype=np.float64)) <= limit  # False for inf (1e999 parses so)
        except OverflowError:  # an integer beyond any float
            fits = np.array([abs(v) <= limit for v in values])
        if not fits.all():
            i = int(np.argmin(fits))
            raise invalid(
                f"{where}: data[{i}] = {echo(values[i], 40)} is out of range for {datatype} "
                f"(finite, magnitude at most {limit:g})"
            )
    return values


def uint64_field(value: int, key: str, where: str) -> int:
    """A JSON integer that a uint64 protocol field carries (shared-memory offsets and sizes)."""
    if not 0 <= value < UINT64_LIMIT:
        raise invalid(f"{where}: '{key}' must be an integer in [0, 2^64), got {echo(value, 40)}")
    return value
