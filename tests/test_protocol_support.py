"""What the README's protocol table says, checked against the real server with real clients: every
request parameter honoured or refused, unsupported Triton APIs answered alike on both protocols, CUDA
shared memory answered over REST as over gRPC, Triton's HTTP status per error class."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import AFFINE_CONFIG, ServerProcess, affine_model, pool_model, write_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_factory) -> ServerProcess:
    repo = tmp_path_factory.mktemp("protocol")
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    return server_factory(repo)


def _request(server: ServerProcess, method: str, path: str, doc: dict | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request(
            method, path, body=None if doc is None else json.dumps(doc), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else {}
    finally:
        conn.close()


def _inputs(mod) -> list:
    a = mod.InferInput("a", [1, 4], "FP32")
    a.set_data_from_numpy(np.ones((1, 4), np.float32))
    b = mod.InferInput("b", [1, 2], "INT64")
    b.set_data_from_numpy(np.zeros((1, 2), np.int64))
    return [a, b]


def _json_infer(**extra) -> dict:
    doc = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [0, 0]},
        ]
    }
    doc.update(extra)
    return doc


def test_request_parameters_honoured_or_refused_over_grpc(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    # honoured
    client.infer("affine", _inputs(tc), timeout=10_000_000, priority=0)
    refused: list[tuple[dict[str, Any], str]] = [
        (dict(parameters={"my_custom": "x"}), "'my_custom'"),
        (dict(priority=3), "priority"),
        (dict(sequence_id=7, sequence_start=True), "sequence_"),
    ]
    for kwargs, needle in refused:
        with pytest.raises(InferenceServerException) as err:
            client.infer("affine", _inputs(tc), **kwargs)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", (kwargs, err.value.message())
        assert needle in err.value.message()
    a, b = _inputs(tc)
    a._input.parameters["binary_data_size"].int64_param = 16  # a REST parameter: not taken over gRPC
    with pytest.raises(InferenceServerException) as err:
        client.infer("affine", [a, b])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "binary_data_size" in err.value.message()
    out = tc.InferRequestedOutput("y")
    out._output.parameters["binary_data"].bool_param = True
    with pytest.raises(InferenceServerException) as err:
        client.infer("affine", _inputs(tc), outputs=[out])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "binary_data" in err.value.message()


def test_request_fields_and_parameters_refused_with_400_over_rest(server: ServerProcess) -> None:
    assert _request(server, "POST", "/v2/models/affine/infer", _json_infer(parameters={"priority": 0}))[0] == 200
    cases = {
        "unknown field": _json_infer(priority=1),
        "custom parameter": _json_infer(parameters={"my_custom": 1}),
        "sequence": _json_infer(parameters={"sequence_id": 4, "sequence_start": True}),
        "input field": {
            "inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], "contents": {}}]
        },
        "input parameter": {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "data": [1, 2, 3, 4],
                    "parameters": {"layout": "NCHW"},
                }
            ]
        },
        "output parameter": _json_infer(outputs=[{"name": "y", "parameters": {"top_k": 1}}]),
        "output field": _json_infer(outputs=[{"name": "y", "datatype": "FP32"}]),
    }
    for what, doc in cases.items():
        status, body = _request(server, "POST", "/v2/models/affine/infer", doc)
        assert status == 400 and body["error"], (what, status, body)


def test_cuda_shared_memory_answered_over_rest_as_over_grpc(server: ServerProcess) -> None:
    grpc_client = tc.InferenceServerClient(server.grpc_url)
    http_client = th.InferenceServerClient(server.http_url)
    assert (
        http_client.get_cuda_shared_memory_status() == []
        and len(grpc_client.get_cuda_shared_memory_status().regions) == 0
    )
    http_client.unregister_cuda_shared_memory()
    http_client.unregister_cuda_shared_memory("anything")
    with pytest.raises(InferenceServerException) as err:
        http_client.register_cuda_shared_memory("gpu0", b"\0" * 64, 0, 64)
    assert err.value.status() == "501" and "CUDA shared memory is not supported" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc_client.register_cuda_shared_memory("gpu0", b"\0" * 64, 0, 64)
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"
    status, body = _request(server, "GET", "/v2/cudasharedmemory/region/gpu0/status")
    assert status == 404 and "gpu0" in body["error"]


def test_unsupported_triton_apis_answer_501_and_other_paths_404(server: ServerProcess) -> None:
    status, body = _request(server, "POST", "/v2/models/affine/generate", {"text_input": "hi"})
    assert status == 501 and "generate" in body["error"]
    status, body = _request(server, "GET", "/v2/no/such/api")
    assert status == 404 and body["error"]


def test_already_exists_is_400_over_rest_as_triton_maps_it(server: ServerProcess) -> None:
    http_client = th.InferenceServerClient(server.http_url)
    handle = shm.create_shared_memory_region("twice", "/cnnserve_protocol_twice", 64)
    try:
        http_client.register_system_shared_memory("twice", "/cnnserve_protocol_twice", 64)
        with pytest.raises(InferenceServerException) as err:
            http_client.register_system_shared_memory("twice", "/cnnserve_protocol_twice", 64)
        assert err.value.status() == "400" and "already registered" in err.value.message()
        http_client.unregister_system_shared_memory("twice")
    finally:
        shm.destroy_shared_memory_region(handle)


def test_exported_image_inputs_declare_nchw(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from export.repository import build_config
    from protos.model_config_pb2 import ModelInput

    image = build_config("pool", onnx.load_from_string(pool_model()), 8)
    assert image.input[0].format == ModelInput.FORMAT_NCHW
    vector = build_config("affine", onnx.load_from_string(affine_model()), 8)
    assert all(i.format == ModelInput.FORMAT_NONE for i in vector.input)


def test_repository_and_shared_memory_bodies_refuse_unknown_fields(server: ServerProcess) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as tpb
    from tritonclient.grpc import service_pb2_grpc as tpb_grpc

    status, body = _request(server, "POST", "/v2/repository/index", {"ready": True, "repository": "x"})
    assert status == 400 and "'repository'" in body["error"]
    status, body = _request(
        server, "POST", "/v2/systemsharedmemory/region/r/register", {"key": "/nothing", "byte_size": 64, "device_id": 0}
    )
    assert status == 400 and "'device_id'" in body["error"]
    with grpc.insecure_channel(server.grpc_url) as ch:
        stub = tpb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.RepositoryIndex(tpb.RepositoryIndexRequest(), timeout=30).models
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryIndex(tpb.RepositoryIndexRequest(repository_name="other"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "repository_name" in (err.value.details() or "")


def test_the_empty_final_response_flag_triton_clients_send_is_taken(server: ServerProcess) -> None:
    """tritonclient's streams and perf_analyzer send `triton_enable_empty_final_response`; no model here
    is decoupled, so every request's one response is its final one and the flag changes nothing."""
    import queue

    answers: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.grpc_url)
    client.start_stream(lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("affine", _inputs(tc), enable_empty_final_response=True)
        result, error = answers.get(timeout=60)
    finally:
        client.stop_stream()
    assert error is None, error
    np.testing.assert_allclose(result.as_numpy("y"), np.full((1, 4), 3.0))
