"""RepositoryModelLoad with Triton's `config` and `file:` overrides, over gRPC and REST with tritonclient."""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, affine_model, write_model

DISK_CONFIG = """max_batch_size: 32
input [{ name: "a" data_type: TYPE_FP32 dims: [4] }, { name: "b" data_type: TYPE_INT64 dims: [2] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] }, { name: "z" data_type: TYPE_INT64 dims: [2] }]
dynamic_batching { }
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("override")
    write_model(repo, "affine", affine_model(), DISK_CONFIG)
    write_model(repo, "other", affine_model(), DISK_CONFIG)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, server_factory) -> ServerProcess:
    return server_factory(repo, "--model-control-mode", "explicit", "--load-model", "*")


def _post(server: ServerProcess, path: str, doc: dict | str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request(
            "POST",
            path,
            body=doc if isinstance(doc, str) else json.dumps(doc),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else {}
    finally:
        conn.close()


def _infer(client: tc.InferenceServerClient, model: str, n: int) -> np.ndarray:
    a = tc.InferInput("a", [n, 4], "FP32")
    a.set_data_from_numpy(np.ones((n, 4), np.float32))
    b = tc.InferInput("b", [n, 2], "INT64")
    b.set_data_from_numpy(np.zeros((n, 2), np.int64))
    return client.infer(model, [a, b]).as_numpy("y")


def _override(max_batch_size: int) -> str:
    return json.dumps({"max_batch_size": max_batch_size, "dynamic_batching": {}})


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_config_override_wins_until_a_load_without_one(server: ServerProcess, protocol: str) -> None:
    client = (
        tc.InferenceServerClient(server.grpc_url) if protocol == "grpc" else th.InferenceServerClient(server.http_url)
    )
    grpc_client = tc.InferenceServerClient(server.grpc_url)

    def served_max_batch() -> int:
        cfg = client.get_model_config("affine")
        return cfg.config.max_batch_size if protocol == "grpc" else cfg["max_batch_size"]

    assert served_max_batch() == 32
    client.load_model("affine", config=_override(8))
    assert served_max_batch() == 8
    assert grpc_client.is_model_ready("affine")
    np.testing.assert_array_equal(_infer(grpc_client, "affine", 8), np.full((8, 4), 3, np.float32))
    with pytest.raises(InferenceServerException) as err:  # 9 is beyond the overridden limit
        _infer(grpc_client, "affine", 9)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    client.load_model("affine")  # no override: config.pbtxt again
    assert served_max_batch() == 32
    _infer(grpc_client, "affine", 9)


def test_bad_overrides_refused_as_invalid_argument_over_grpc(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    bad: dict[str, dict[str, Any]] = {
        "not JSON at all": dict(config="max_batch_size: 8"),
        "unknown field": dict(config=json.dumps({"max_batch_size": 8, "no_such_field": 1})),
        "wrong type": dict(config=json.dumps({"max_batch_size": "eight"})),
        "another model's name": dict(config=json.dumps({"name": "affine", "max_batch_size": 8})),
        "negative max_batch_size": dict(config=json.dumps({"max_batch_size": -1})),
        "files without config": dict(files={"file:1/model.onnx": affine_model()}),
        "path outside the model": dict(config=_override(8), files={"file:../1/model.onnx": affine_model()}),
    }
    for what, kwargs in bad.items():
        with pytest.raises(InferenceServerException) as err:
            client.load_model("other", **kwargs)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", (what, err.value.message())
    assert client.get_model_config("other").config.max_batch_size == 32  # nothing refused took effect
    assert client.is_model_ready("other")


def test_bad_overrides_refused_with_400_over_http(server: ServerProcess) -> None:
    cases: list[dict[str, Any]] = [
        {"parameters": {"config": "{not json"}},
        {"parameters": {"config": json.dumps({"max_batch_size": 8, "no_such_field": 1})}},
        {"parameters": {"config": 8}},
        {"parameters": {"no_such_parameter": "x"}},
        {"parameters": {"file:1/model.onnx": "%%% not base64"}, "config": "{}"},
        {"parameters": {"config": _override(8), "file:1/model.onnx": "%%% not base64"}},
        {"parameters": []},
    ]
    for doc in cases:
        status, body = _post(server, "/v2/repository/models/other/load", doc)
        assert status == 400 and body["error"], (doc, status, body)
    assert th.InferenceServerClient(server.http_url).get_model_config("other")["max_batch_size"] == 32


def test_unknown_model_is_not_found_without_server_paths(server: ServerProcess, repo: Path) -> None:
    with pytest.raises(InferenceServerException) as err:
        tc.InferenceServerClient(server.grpc_url).load_model("no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert str(repo) not in err.value.message() and "no_such_model" in err.value.message()
    status, body = _post(server, "/v2/repository/models/no_such_model/load", {})
    assert status == 404 and str(repo) not in body["error"]


def test_file_overrides_load_a_model_from_the_request(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    client.load_model("uploaded", config=_override(4), files={"file:1/model.onnx": affine_model()})
    assert client.is_model_ready("uploaded") and client.get_model_config("uploaded").config.max_batch_size == 4
    np.testing.assert_array_equal(_infer(client, "uploaded", 2), np.full((2, 4), 3, np.float32))
    # REST carries the file in base64 (tritonclient.http's own files= cannot JSON-encode its bytes)
    doc = {"parameters": {"config": _override(2), "file:3/model.onnx": base64.b64encode(affine_model()).decode()}}
    status, body = _post(server, "/v2/repository/models/uploaded_rest/load", doc)
    assert status == 200, body
    meta = client.get_model_metadata("uploaded_rest")
    assert list(meta.versions) == ["3"] and client.get_model_config("uploaded_rest").config.max_batch_size == 2
    client.unload_model("uploaded_rest")
    th.InferenceServerClient(server.http_url).unload_model("uploaded", unload_dependents=True)
    assert not client.is_model_ready("uploaded")


def test_a_failed_file_override_names_the_request_not_server_paths(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.load_model("uploaded_bad", config=_override(4), files={"file:1/model.onnx": b"not onnx"})
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "cnnserve-override" not in err.value.message() and "load request files" in err.value.message()


def test_served_config_round_trips_as_an_override(server: ServerProcess) -> None:
    """What a client reads (get_model_config as JSON), edited and sent back, is a valid override."""
    http_client = th.InferenceServerClient(server.http_url)
    grpc_client = tc.InferenceServerClient(server.grpc_url)
    for edit, client in (
        (http_client.get_model_config("other"), http_client),
        (grpc_client.get_model_config("other", as_json=True)["config"], grpc_client),
    ):
        edit["max_batch_size"] = 16
        client.load_model("other", config=json.dumps(edit))
        assert grpc_client.get_model_config("other").config.max_batch_size == 16
        client.load_model("other")
        assert grpc_client.get_model_config("other").config.max_batch_size == 32
