"""The KServe v2 REST binding end to end: the real server process, unmodified tritonclient.http (binary
data extension both ways, JSON tensors), a plain HTTP client as curl would send, the vision API over
HTTP, and the limits (oversize bodies, bad JSON, wrong content types, slow clients, huge headers)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as th
from PIL import Image
from tritonclient.utils import InferenceServerException

from conftest import AFFINE_CONFIG, ServerProcess, affine_model, cast_model, strings_model, write_model
from vision_synthetic import build_synthetic_repository

pytestmark = pytest.mark.timeout(180)

MAX_INPUT = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_factory) -> ServerProcess:
    repo = build_synthetic_repository(tmp_path_factory.mktemp("http_repo"))
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    write_model(repo, "cast", cast_model(), "max_batch_size: 4\n")
    write_model(repo, "strings", strings_model(), "max_batch_size: 0\n")
    write_model(repo, "unloadable", affine_model(), "max_batch_size: 8\n")
    return server_factory(
        repo,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
        "--http-max-input-size",
        str(MAX_INPUT),
        "--http-body-timeout-secs",
        "1",
        "--http-idle-timeout-secs",
        "1",
    )


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> th.InferenceServerClient:
    return th.InferenceServerClient(server.http_url)


def _request(
    server: ServerProcess, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _affine(binary: bool = True) -> tuple[list, np.ndarray, np.ndarray]:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(6, dtype=np.int64).reshape(3, 2)
    ia = th.InferInput("a", [3, 4], "FP32")
    ia.set_data_from_numpy(a, binary_data=binary)
    ib = th.InferInput("b", [3, 2], "INT64")
    ib.set_data_from_numpy(b, binary_data=binary)
    return [ia, ib], 2 * a + 1, b + 3


def _still_serving(server: ServerProcess) -> None:
    assert _request(server, "GET", "/v2/health/ready")[0] == 200


# -- tritonclient.http, every endpoint ------------------------------------------------------------------
def test_health_and_metadata(client: th.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("affine") and not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta["name"] == "cnnserve" and "model_repository" in meta["extensions"]
    m = client.get_model_metadata("affine")
    assert m["name"] == "affine" and m["versions"] == ["1"]
    assert m["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "b", "datatype": "INT64", "shape": [-1, 2]},
    ]
    assert client.get_model_metadata("affine", model_version="1")["name"] == "affine"


def test_config_statistics_and_index(client: th.InferenceServerClient) -> None:
    cfg = client.get_model_config("affine")
    assert cfg["name"] == "affine" and cfg["max_batch_size"] == 8
    assert cfg["input"][0]["dims"] == [4] and cfg["input"][0]["data_type"] == "TYPE_FP32"
    inputs, _, _ = _affine()
    client.infer("affine", inputs)
    stats = client.get_inference_statistics("affine")["model_stats"]
    assert stats[0]["name"] == "affine" and stats[0]["inference_count"] >= 3
    assert isinstance(stats[0]["inference_stats"]["success"]["ns"], int)
    assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} >= {"affine", "cast"}
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["affine"]["state"] == "READY" and index["affine"]["version"] == "1"


def test_unload_and_load(client: th.InferenceServerClient) -> None:
    client.unload_model("unloadable")
    assert not client.is_model_ready("unloadable")
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("unloadable")
    assert info.value.status() == "503"
    client.load_model("unloadable")
    assert client.is_model_ready("unloadable")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_binary_and_json(client: th.InferenceServerClient, binary: bool) -> None:
    inputs, y, z = _affine(binary)
    outputs = [th.InferRequestedOutput("y", binary_data=binary), th.InferRequestedOutput("z", binary_data=binary)]
    result = client.infer("affine", inputs, outputs=outputs, request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("z"), z)
    assert result.get_response()["id"] == "r-1"
    # no outputs named: tritonclient asks for all of them in binary
    result = client.infer("affine", inputs)
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    assert result.get_output("y")["parameters"]["binary_data_size"] == y.nbytes


def test_infer_bytes_and_half(client: th.InferenceServerClient, server: ServerProcess) -> None:
    s = np.array([b"alpha", b"", "ünï".encode()], dtype=np.object_)
    for binary in (True, False):
        inp = th.InferInput("s", [3], "BYTES")
        inp.set_data_from_numpy(s, binary_data=binary)
        out = client.infer("strings", [inp], outputs=[th.InferRequestedOutput("t", binary_data=binary)])
        assert [bytes(v) if not isinstance(v, str) else v.encode() for v in out.as_numpy("t")] == list(s)
    x = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    inp = th.InferInput("x", [2, 2, 3], "UINT8")
    inp.set_data_from_numpy(x)
    out = client.infer("cast", [inp]).as_numpy("y")
    import tritonclient.grpc as tc  # FP16 comes back bit for bit as the gRPC binding answers it

    g = tc.InferInput("x", [2, 2, 3], "UINT8")
    g.set_data_from_numpy(x)
    expected = tc.InferenceServerClient(server.grpc_url).infer("cast", [g]).as_numpy("y")
    assert out.dtype == np.float16 and np.array_equal(out, expected) and np.count_nonzero(out) == 11


def test_compressed_request_and_response(client: th.InferenceServerClient, server: ServerProcess) -> None:
    inputs, y, _ = _affine()
    for algorithm in ("gzip", "deflate"):
        for binary in (True, False):
            outputs = [th.InferRequestedOutput("y", binary_data=binary)]
            result = client.infer(
                "affine",
                inputs,
                outputs=outputs,
                request_compression_algorithm=algorithm,
                response_compression_algorithm=algorithm,
            )
            np.testing.assert_array_equal(result.as_numpy("y"), y)
    # JSON answers are compressed when accepted, binary tensors never (they barely compress)
    body = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                {"name": "b", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
            ]
        }
    )
    _, headers, _ = _request(server, "POST", "/v2/models/affine/infer", body.encode(), {"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    binary = json.loads(body)
    binary["parameters"] = {"binary_data_output": True}
    _, headers, _ = _request(
        server, "POST", "/v2/models/affine/infer", json.dumps(binary).encode(), {"Accept-Encoding": "gzip"}
    )
    assert "Content-Encoding" not in headers and "Inference-Header-Content-Length" in headers


def test_request_path_errors_keep_their_status(client: th.InferenceServerClient, server: ServerProcess) -> None:
    inp = th.InferInput("a", [3, 5], "FP32")
    inp.set_data_from_numpy(np.zeros((3, 5), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("affine", [inp])
    assert info.value.status() == "400" and "'a'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", [inp])
    assert info.value.status() == "404"
    inputs, _, _ = _affine()
    with pytest.raises(InferenceServerException) as info:
        client.infer("affine", inputs, outputs=[th.InferRequestedOutput("w")])
    assert info.value.status() == "400" and "'w'" in info.value.message()
    _still_serving(server)


# -- a plain HTTP client, as curl sends ----------------------------------------------------------------
def test_plain_json_infer_with_nested_data(server: ServerProcess) -> None:
    body = {
        "id": "curl",
        "inputs": [
            {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]},
            {"name": "b", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]},
        ],
    }
    status, headers, raw = _request(
        server, "POST", "/v2/models/affine/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, raw
    assert headers["Content-Type"].startswith("application/json")
    answer = json.loads(raw)
    assert answer["model_name"] == "affine" and answer["model_version"] == "1" and answer["id"] == "curl"
    out = {o["name"]: o for o in answer["outputs"]}
    assert out["y"] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [2, 4],
        "data": [3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0],
    }
    assert out["z"]["data"] == [4, 5, 6, 7]
    # curl -d without a Content-Type sends a form type; JSON is still what it holds
    status, _, raw = _request(
        server,
        "POST",
        "/v2/models/affine/versions/1/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200, raw


def test_plain_binary_infer(server: ServerProcess) -> None:
    a = np.ones((1, 4), np.float32)
    b = np.zeros((1, 2), np.int64)
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
                {"name": "b", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": b.nbytes}},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        }
    ).encode()
    status, headers, raw = _request(
        server,
        "POST",
        "/v2/models/affine/infer",
        header + a.tobytes() + b.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200, raw
    n = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(raw[:n])
    y, z = answer["outputs"]
    assert y["parameters"]["binary_data_size"] == 16 and "data" not in y
    np.testing.assert_array_equal(np.frombuffer(raw[n:], np.float32), np.full(4, 3.0, np.float32))
    assert z["data"] == [3, 3]


def test_every_get_endpoint_answers_json(server: ServerProcess) -> None:
    for path in (
        "/v2",
        "/v2/models/affine",
        "/v2/models/affine/versions/1",
        "/v2/models/affine/config",
        "/v2/models/affine/stats",
        "/v2/models/affine/versions/1/stats",
        "/v2/models/stats",
    ):
        status, headers, raw = _request(server, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith("application/json"), path
        json.loads(raw)
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/affine/ready",
        "/v2/models/affine/versions/1/ready",
    ):
        assert _request(server, "GET", path)[0] == 200, path
    assert _request(server, "GET", "/v2/models/affine/versions/7/ready")[0] == 400
    status, _, raw = _request(server, "POST", "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and all(m["state"] == "READY" for m in json.loads(raw))


@pytest.mark.parametrize(
    "body, headers, status, says",
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
        (b"[1, 2]", {}, 400, "must be a JSON object"),
        (b'{"inputs": 3}', {}, 400, "'inputs' must be list"),
        (b'{"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32"}]}', {}, 400, "neither 'data'"),
        (b'{"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": ["x", 1, 2, 3]}]}', {}, 400, "'a'"),
        (b'{"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2], 3, 4]}]}', {}, 400, "mixes"),
        (b"[" * 100000 + b"]" * 100000, {}, 400, "nests too deeply"),
        (b'{"inputs": []}', {"Content-Type": "image/png"}, 400, "Content-Type"),
        (b'{"inputs": []}', {"Content-Type": "multipart/form-data; boundary=x"}, 400, "Content-Type"),
        (b'{"inputs": []}xx', {"Inference-Header-Content-Length": "99"}, 400, "Inference-Header-Content-Length"),
        (b'{"inputs": []}xx', {"Inference-Header-Content-Length": "14"}, 400, "2 bytes of binary data"),
        (b"x" * (MAX_INPUT + 1), {}, 413, "--http-max-input-size"),
    ],
)
def test_bad_requests_get_the_v2_error(
    server: ServerProcess, body: bytes, headers: dict, status: int, says: str
) -> None:
    got, resp_headers, raw = _request(server, "POST", "/v2/models/affine/infer", body, headers)
    assert got == status, raw
    assert resp_headers["Content-Type"].startswith("application/json")
    assert says in json.loads(raw)["error"]
    _still_serving(server)


def test_unknown_routes_and_methods_get_the_v2_error(server: ServerProcess) -> None:
    status, _, raw = _request(server, "GET", "/v2/nothing/here")
    assert status == 404 and "error" in json.loads(raw)
    status, headers, raw = _request(server, "GET", "/v2/models/affine/infer")
    assert status == 405 and "error" in json.loads(raw) and "POST" in headers.get("Allow", "")


# -- limits: slow clients, huge headers --------------------------------------------------------------
def _raw_exchange(server: ServerProcess, data: bytes) -> bytes:
    """Send `data`, then read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_trickling_body_is_cut_off(server: ServerProcess) -> None:
    # 10 of the 1000 promised bytes, then nothing: answered 408 and closed once the body timeout passes
    head = b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    reply = _raw_exchange(server, head + b'{"inputs":')
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"--http-body-timeout-secs" in reply
    _still_serving(server)


def test_incomplete_headers_are_closed(server: ServerProcess) -> None:
    assert _raw_exchange(server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n") == b""
    _still_serving(server)


def test_oversized_headers_are_refused(server: ServerProcess) -> None:
    status, _, _ = _request(server, "GET", "/v2/health/live", headers={"X-Big": "a" * 20000})
    assert status == 400
    _still_serving(server)


# -- the vision API over HTTP ----------------------------------------------------------------------------
def _png(colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _grpc_answer(server: ServerProcess, rpc: str, images: list[bytes], **options) -> dict:
    from client import VisionClient
    from cnncore.protojson import message_to_dict

    with VisionClient(server.grpc_url) as v:
        return message_to_dict(getattr(v, rpc)(options.pop("model"), images, **options), bytes_as="base64")


def test_vision_classify_with_an_image_body(server: ServerProcess) -> None:
    status, _, raw = _request(
        server,
        "POST",
        "/v2/vision/models/colour_classifier/classify?top_k=2",
        _png((250, 10, 10)),
        {"Content-Type": "image/png"},
    )
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["results"][0]["classes"][0]["label"] == "red"
    assert len(answer["results"][0]["classes"]) == 2
    # the same JSON as the gRPC API answers (and the CLI prints)
    assert answer == _grpc_answer(server, "classify", [_png((250, 10, 10))], model="colour_classifier", top_k=2)


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_vision_multipart_segment_and_detect(server: ServerProcess) -> None:
    body, ctype = _multipart(
        [
            ("dark.png", _png((5, 5, 5), (32, 32))),
            ("bright.png", _png((250, 250, 250), (32, 32))),
            ("broken.png", b"not a picture"),
        ]
    )
    status, _, raw = _request(
        server, "POST", "/v2/vision/models/bright_segmenter/segment", body, {"Content-Type": ctype}
    )
    assert status == 200, raw
    results = json.loads(raw)["results"]
    assert [r["source"] for r in results] == ["dark.png", "bright.png", "broken.png"]
    assert results[0]["mask_png"] and results[2]["image"]["error"]["reason"]
    expected = _grpc_answer(server, "segment", [_png((5, 5, 5), (32, 32))], model="bright_segmenter")
    assert results[0]["mask_png"] == expected["results"][0]["mask_png"]
    status, _, raw = _request(
        server,
        "POST",
        "/v2/vision/models/box_detector/detect?score_threshold=0.5",
        _png((9, 9, 9), (64, 64)),
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 200, raw
    assert json.loads(raw)["results"][0]["detections"][0]["label"] == "thing"


def test_vision_errors(server: ServerProcess) -> None:
    status, _, raw = _request(
        server, "POST", "/v2/vision/models/colour_classifier/classify", b"{}", {"Content-Type": "application/json"}
    )
    assert status == 400 and "Content-Type" in json.loads(raw)["error"]
    status, _, raw = _request(
        server, "POST", "/v2/vision/models/affine/classify", _png((1, 2, 3)), {"Content-Type": "image/png"}
    )
    assert status == 400 and "model.json" in json.loads(raw)["error"]  # FAILED_PRECONDITION -> 400
    status, _, raw = _request(
        server, "POST", "/v2/vision/models/colour_classifier/paint", _png((1, 2, 3)), {"Content-Type": "image/png"}
    )
    assert status == 404 and "classify" in json.loads(raw)["error"]
    for query in ("top_k=many", "top_k=-1"):
        status, _, raw = _request(
            server,
            "POST",
            f"/v2/vision/models/colour_classifier/classify?{query}",
            _png((1, 2, 3)),
            {"Content-Type": "image/png"},
        )
        error = json.loads(raw)["error"]
        assert status == 400 and ("top_k" in error or "not a number" in error), raw
    status, _, raw = _request(
        server,
        "POST",
        "/v2/vision/models/box_detector/detect?score_threshold=2",
        _png((1, 2, 3)),
        {"Content-Type": "image/png"},
    )
    assert status == 400 and "score_threshold" in json.loads(raw)["error"]
    _still_serving(server)


def test_http_traffic_is_counted_with_grpc(server: ServerProcess, client: th.InferenceServerClient) -> None:
    key = ("nv_inference_request_success", (("model", "affine"), ("version", "1")))
    before = server.scrape()[key]
    inputs, _, _ = _affine()
    client.infer("affine", inputs)
    assert server.scrape()[key] == before + 1


# -- system shared memory over HTTP (the registry the gRPC binding uses) ----------------------------------
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs POSIX shared memory (/dev/shm)")
def test_system_shared_memory_over_http(client: th.InferenceServerClient, server: ServerProcess) -> None:
    import tritonclient.grpc as tc
    import tritonclient.utils.shared_memory as shm

    tag = uuid.uuid4().hex[:10]
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    handles = [
        shm.create_shared_memory_region(f"in_{tag}", f"/cnnserve_http_in_{tag}", a.nbytes),
        shm.create_shared_memory_region(f"out_{tag}", f"/cnnserve_http_out_{tag}", a.nbytes),
    ]
    try:
        shm.set_shared_memory_region(handles[0], [a])
        client.register_system_shared_memory(f"in_{tag}", f"/cnnserve_http_in_{tag}", a.nbytes)
        client.register_system_shared_memory(f"out_{tag}", f"/cnnserve_http_out_{tag}", a.nbytes)
        status = {r["name"]: r for r in client.get_system_shared_memory_status()}
        assert status[f"in_{tag}"]["byte_size"] == a.nbytes and status[f"in_{tag}"]["key"] == f"/cnnserve_http_in_{tag}"
        # one registry for both bindings: the gRPC binding sees what HTTP registered
        grpc_status = tc.InferenceServerClient(server.grpc_url).get_system_shared_memory_status(f"in_{tag}")
        assert list(grpc_status.regions) == [f"in_{tag}"]
        ia = th.InferInput("a", [2, 4], "FP32")
        ia.set_shared_memory(f"in_{tag}", a.nbytes)
        ib = th.InferInput("b", [2, 2], "INT64")
        ib.set_data_from_numpy(np.ones((2, 2), np.int64))
        oy = th.InferRequestedOutput("y")
        oy.set_shared_memory(f"out_{tag}", a.nbytes)
        result = client.infer("affine", [ia, ib], outputs=[oy, th.InferRequestedOutput("z")])
        assert result.get_output("y")["parameters"]["shared_memory_region"] == f"out_{tag}"
        y = shm.get_contents_as_numpy(handles[1], np.float32, [2, 4])
        np.testing.assert_array_equal(y, 2 * a + 1)
        np.testing.assert_array_equal(result.as_numpy("z"), np.full((2, 2), 4))
        # a window past the region is refused, naming it
        bad = th.InferInput("a", [2, 4], "FP32")
        bad.set_shared_memory(f"in_{tag}", a.nbytes, offset=8)
        with pytest.raises(InferenceServerException) as info:
            client.infer("affine", [bad, ib])
        assert info.value.status() == "400" and f"in_{tag}" in info.value.message()
        client.unregister_system_shared_memory(f"in_{tag}")
        assert f"in_{tag}" not in {r["name"] for r in client.get_system_shared_memory_status()}
    finally:
        client.unregister_system_shared_memory()
        for h in handles:
            shm.destroy_shared_memory_region(h)
    _still_serving(server)


# -- graceful shutdown over HTTP: the same drain as gRPC ------------------------------------------------
def test_sigterm_answers_accepted_http_requests(tmp_path: Path, server_factory) -> None:
    import asyncio
    import signal

    import tritonclient.http.aio as tha

    from conftest import SLOW_WIDTH, slow_model
    from fault_backends import FileGate

    repo = tmp_path / "repo"
    gate = FileGate(tmp_path / "gate")
    gate.close()  # executions are held until the test has seen the server draining
    write_model(
        repo,
        "slow",
        slow_model(iterations=10),
        f'backend: "test_faulty"\ndefault_model_filename: "model.onnx"\nmax_batch_size: 4\n'
        f'dynamic_batching {{ }}\nparameters {{ key: "gate_file" value {{ string_value: "{gate.path}" }} }}\n',
    )
    srv = server_factory(repo, "--backend-module", "fault_backends")
    n = 4

    async def main():
        client = tha.InferenceServerClient(srv.http_url)
        try:

            async def one(i: int) -> tuple[int, np.ndarray]:
                inp = tha.InferInput("x", [1, SLOW_WIDTH], "FP32")
                inp.set_data_from_numpy(np.full((1, SLOW_WIDTH), i / n, np.float32))
                return i, (await client.infer("slow", [inp])).as_numpy("y")

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            await srv.wait_pending("slow", n)
            await asyncio.to_thread(gate.wait_entered, 1)
            srv.proc.send_signal(signal.SIGTERM)
            while (await asyncio.to_thread(_request, srv, "GET", "/v2/health/ready"))[0] == 200:
                pass  # until the signal is handled
            model_ready = (await asyncio.to_thread(_request, srv, "GET", "/v2/models/slow/ready"))[0]
            late = json.dumps(
                {"inputs": [{"name": "x", "shape": [1, SLOW_WIDTH], "datatype": "FP32", "data": [0.0] * SLOW_WIDTH}]}
            ).encode()
            late_status, _, late_body = await asyncio.to_thread(_request, srv, "POST", "/v2/models/slow/infer", late)
            gate.open()
            return await asyncio.gather(*tasks, return_exceptions=True), model_ready, late_status, late_body
        finally:
            await client.close()

    results, model_ready, late_status, late_body = asyncio.run(main())
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sorted(i for i, _ in results) == list(range(n))
    assert model_ready == 400
    assert late_status == 503 and "shutting down" in json.loads(late_body)["error"]
    assert srv.proc.wait(30) == 0, srv.log()
