"""Strict, bounded REST bodies (issue 20) against the real server over plain HTTP: standard JSON only,
tensor data of its declared datatype and range, every body decoding failure a 400 / 413 / 415 with the v2
error body, shared-memory registration integers within uint64, and a gzip bomb inflated under the cap
while the event loop keeps answering."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import zlib
from pathlib import Path

import brotli
import numpy as np
import pytest

from conftest import AFFINE_CONFIG, ServerProcess, affine_model, cast_model, write_model
from vision_synthetic import build_synthetic_repository

pytestmark = pytest.mark.timeout(180)

MAX_INPUT = 1 << 20
AFFINE = "/v2/models/affine/infer"
CLASSIFY = "/v2/vision/models/colour_classifier/classify"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_factory) -> ServerProcess:
    repo = build_synthetic_repository(tmp_path_factory.mktemp("http_body_repo"))
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    write_model(repo, "cast", cast_model(), "max_batch_size: 4\n")
    return server_factory(repo, "--http-max-input-size", str(MAX_INPUT))


def _post(server: ServerProcess, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    assert resp.getheader("Content-Type", "").startswith("application/json"), (resp.status, raw[:200])
    return resp.status, json.loads(raw)


def _affine_doc(a: list, b: list, a_type: str = "FP32", b_type: str = "INT64") -> dict:
    return {
        "inputs": [
            {"name": "a", "datatype": a_type, "shape": [1, 4], "data": a},
            {"name": "b", "datatype": b_type, "shape": [1, 2], "data": b},
        ]
    }


def _affine(a: list, b: list, **types: str) -> bytes:
    return json.dumps(_affine_doc(a, b, **types)).encode()


def _refused(
    server: ServerProcess,
    body: bytes,
    status: int,
    *needles: str,
    path: str = AFFINE,
    headers: dict[str, str] | None = None,
) -> str:
    got, doc = _post(server, path, body, headers)
    assert got == status, (got, doc)
    for n in needles:
        assert n in doc["error"], doc
    return doc["error"]


# -- JSON and tensor values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_json_numbers_are_refused(server: ServerProcess, token: str) -> None:
    body = _affine([0.0, 0.4693, -0.643, 1.0], [1, 2]).replace(b"0.0,", f"{token},".encode())
    assert token.encode() in body
    _refused(server, body, 400, "not valid JSON", token)


def test_null_data_is_refused_naming_the_input_and_index(server: ServerProcess) -> None:
    _refused(server, _affine([None] * 4, [1, 2]), 400, "input 'a'", "data[0] is null", "FP32")
    _refused(server, _affine([1.0, 2.0, 3.0, None], [1, 2]), 400, "input 'a'", "data[3] is null")
    _refused(server, _affine([1.0, 2.0, 3.0, 4.0], [1, None]), 400, "input 'b'", "data[1] is null", "INT64")


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("1.5", "a string"),
        (True, "data[2] is true"),
        ({"x": 1}, "an object"),
        ([1.0], "a list"),
        ("@1e999", "out of range for FP32"),
        ("@-4e38", "out of range for FP32"),
        ("@1" + "0" * 400, "out of range"),
    ],
)
def test_non_numeric_or_non_finite_fp32_data_is_refused(server: ServerProcess, bad, needle: str) -> None:
    body = _affine([1.0, 2.0, bad, 4.0], [1, 2])
    if isinstance(bad, str) and bad.startswith("@"):  # a JSON number json.dumps would not write as such
        body = body.replace(f'"{bad}"'.encode(), bad[1:].encode())
    _refused(server, body, 400, "input 'a'", "data[2]", needle)


# Each integer datatype declared for input 'b': one value past each end of its range is refused before the
# model is looked at (the declared datatype is what the values must fit).
INT_RANGES = [
    (dt, int(np.iinfo(dt.lower()).min), int(np.iinfo(dt.lower()).max))
    for dt in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
]


@pytest.mark.parametrize("datatype, lo, hi", INT_RANGES)
def test_integers_beyond_their_datatype_are_refused(server: ServerProcess, datatype: str, lo: int, hi: int) -> None:
    for value in (lo - 1, hi + 1):
        _refused(
            server,
            _affine([1.0, 2.0, 3.0, 4.0], [0, value], b_type=datatype),
            400,
            "input 'b'",
            "data[1]",
            f"out of range for {datatype} [{lo}, {hi}]",
        )
    _refused(
        server,
        _affine([1.0, 2.0, 3.0, 4.0], [0, 1.0], b_type=datatype),
        400,
        "data[1] is a number",
        f"{datatype} data must be integers",
    )


def test_bool_and_fp16_data_must_fit_their_datatype(server: ServerProcess) -> None:
    _refused(
        server,
        _affine([1.0, 2.0, 3.0, 4.0], [True, 1], b_type="BOOL"),
        400,
        "data[1] is an integer",
        "BOOL data must be true or false",
    )
    _refused(server, _affine([1.0, 70000.0, 3.0, 4.0], [1, 2], a_type="FP16"), 400, "data[1]", "out of range for FP16")


def test_values_at_the_ends_of_their_range_are_served(server: ServerProcess) -> None:
    lo = int(np.iinfo(np.int64).min)
    status, doc = _post(server, AFFINE, _affine([1, 2.5, -3, 4], [lo, 7]))
    assert status == 200, doc
    assert doc["outputs"][0]["data"] == [3.0, 6.0, -5.0, 9.0] and doc["outputs"][1]["data"] == [lo + 3, 10]
    data = [0, 1, 2, 253, 254, 255]
    cast = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 2, 3], "data": data}]}
    status, doc = _post(server, "/v2/models/cast/infer", json.dumps(cast).encode())
    assert status == 200, doc
    y = np.array(doc["outputs"][0]["data"])  # x scaled by the model's constant: proportional to x
    assert np.allclose(y / y[1], [0, 1, 2, 253, 254, 255], rtol=1e-3), doc
    data[5] = 256
    _refused(
        server,
        json.dumps(cast).encode(),
        400,
        "input 'x'",
        "data[5]",
        "out of range for UINT8 [0, 255]",
        path="/v2/models/cast/infer",
    )


# -- content encodings, charsets, multipart ---------------------------------------------------------------------
GOOD = _affine([1.0, 2.0, 3.0, 4.0], [1, 2])


@pytest.mark.parametrize(
    "encoding, body",
    [
        ("gzip", gzip.compress(GOOD)),
        ("x-gzip", gzip.compress(GOOD[:50]) + gzip.compress(GOOD[50:])),  # two members, one body
        ("deflate", zlib.compress(GOOD)),
        ("deflate", zlib.compress(GOOD)[2:-4]),  # raw deflate, as some clients send it
        ("br", brotli.compress(GOOD)),
        ("gzip, identity", gzip.compress(GOOD)),
        ("deflate, br", brotli.compress(zlib.compress(GOOD))),
    ],
    ids=["gzip", "gzip-members", "deflate", "raw-deflate", "br", "gzip-identity", "deflate-br"],
)
def test_encoded_bodies_are_served(server: ServerProcess, encoding: str, body: bytes) -> None:
    status, doc = _post(server, AFFINE, body, {"Content-Encoding": encoding})
    assert status == 200 and doc["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0], doc


@pytest.mark.parametrize(
    "path, body, headers, status, needle",
    [
        (AFFINE, b"garbage", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
        (AFFINE, b"garbage", {"Content-Encoding": "deflate"}, 400, "not valid deflate"),
        (AFFINE, b"garbage", {"Content-Encoding": "br"}, 400, "not valid br"),
        (AFFINE, gzip.compress(GOOD)[:-12], {"Content-Encoding": "gzip"}, 400, "not complete gzip"),
        (AFFINE, zlib.compress(GOOD) + b"tail", {"Content-Encoding": "deflate"}, 400, "after the end of its deflate"),
        (AFFINE, GOOD, {"Content-Encoding": "zstd"}, 415, "Content-Encoding 'zstd' is not taken"),
        (AFFINE, GOOD, {"Content-Encoding": "compress"}, 415, "Content-Encoding 'compress' is not taken"),
        (AFFINE, GOOD, {"Content-Type": "application/json; charset=utf-16"}, 415, "charset 'utf-16'"),
        (AFFINE, GOOD, {"Content-Type": "application/json; charset=nope"}, 415, "charset 'nope'"),
        (CLASSIFY, b"garbage", {"Content-Type": "image/png", "Content-Encoding": "gzip"}, 400, "not valid gzip"),
        (
            CLASSIFY,
            b"garbage",
            {"Content-Type": "multipart/form-data; boundary=x", "Content-Encoding": "gzip"},
            415,
            "multipart/form-data body cannot have a Content-Encoding",
        ),
        (
            CLASSIFY,
            b'--x\r\nContent-Disposition: form-data; name="a"\r\nContent-Type: text/plain; charset=nope\r\n\r\n'
            b"abc\r\n--x--\r\n",
            {"Content-Type": "multipart/form-data; boundary=x"},
            400,
            "unknown encoding",
        ),
        (
            CLASSIFY,
            b'--x\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\nnope\r\n--x\r\n'
            b'Content-Disposition: form-data; name="a"\r\n\r\nabc\r\n--x--\r\n',
            {"Content-Type": "multipart/form-data; boundary=x"},
            400,
            "unreadable multipart/form-data",
        ),
    ],
    ids=[
        "gzip-garbage",
        "deflate-garbage",
        "br-garbage",
        "gzip-truncated",
        "deflate-trailing",
        "zstd",
        "compress",
        "utf-16",
        "unknown-charset",
        "image-gzip-garbage",
        "multipart-gzip",
        "part-charset",
        "form-charset",
    ],
)
def test_body_decoding_errors_are_client_errors_with_the_v2_body(
    server: ServerProcess, path: str, body: bytes, headers: dict, status: int, needle: str
) -> None:
    _refused(server, body, status, needle, path=path, headers=headers)


def _bomb(inflated: int, coding: str = "gzip") -> bytes:
    """A body of `inflated` zero bytes, compressed (about 1000:1)."""
    if coding == "br":
        return brotli.compress(bytes(inflated), quality=1)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    return b"".join([*(c.compress(block) for _ in range(inflated >> 20)), c.flush()])


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_bomb_is_refused_at_the_cap_on_the_decompressed_size(server: ServerProcess, coding: str) -> None:
    body = _bomb(64 << 20, coding)
    assert len(body) < MAX_INPUT
    _refused(
        server,
        body,
        413,
        f"decoded from {coding} exceeds the limit of {MAX_INPUT} bytes",
        "--http-max-input-size",
        headers={"Content-Encoding": coding},
    )
    assert _post(server, AFFINE, GOOD)[0] == 200


def test_inflating_a_bomb_leaves_the_event_loop_answering(tmp_path: Path, server_factory) -> None:
    """The bomb is inflated while another request is answered: ordered by the server's state (the bomb
    admitted and unanswered, per its in-flight gauge and its silent socket), not by a clock."""
    repo = tmp_path / "repo"
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    cap = 256 << 20
    srv = server_factory(repo, "--http-max-input-size", str(cap))
    body = _bomb(cap + (16 << 20))
    key = ("cnnserve_inflight_requests", ())
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=60) as bomb:
        bomb.sendall(
            f"POST {AFFINE} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        for _ in range(20_000):  # the metrics endpoint runs on its own thread
            if srv.scrape().get(key) == 1:
                break
        else:
            raise AssertionError("the bomb was never admitted")
        conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().status == 200
        conn.close()
        bomb.setblocking(False)
        with pytest.raises(BlockingIOError):
            bomb.recv(1)  # the bomb is still being inflated: the loop answered around it
        assert srv.scrape().get(key) == 1
        bomb.setblocking(True)
        head = bomb.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


# -- shared memory registration integers ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("byte_size", 2**64, "'byte_size' must be an integer in [0, 2^64)"),
        ("byte_size", 2**70, "'byte_size' must be an integer in [0, 2^64)"),
        ("offset", 2**64, "'offset' must be an integer in [0, 2^64)"),
        ("offset", -1, "'offset' must be an integer in [0, 2^64)"),
        ("byte_size", 1.5, "'byte_size' must be int"),
        ("offset", "0", "'offset' must be int"),
    ],
)
def test_shared_memory_register_integers_beyond_uint64_are_400(
    server: ServerProcess, field: str, value, needle: str
) -> None:
    doc = {"key": "/cnnserve_no_such_key", "byte_size": 8, "offset": 0, field: value}
    _refused(server, json.dumps(doc).encode(), 400, needle, path="/v2/systemsharedmemory/region/x/register")


def test_server_survives_the_hostile_bodies(server: ServerProcess) -> None:
    assert server.proc.poll() is None
    assert _post(server, AFFINE, GOOD)[0] == 200
