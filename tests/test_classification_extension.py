"""Triton's classification extension (`class_count`) over gRPC and REST, with tritonclient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, affine_model, strings_model, write_model
from server.dataplane.classification import top_classes

CONFIG = """max_batch_size: 8
input [{ name: "a" data_type: TYPE_FP32 dims: [4] }, { name: "b" data_type: TYPE_INT64 dims: [2] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] label_filename: "labels.txt" },
        { name: "z" data_type: TYPE_INT64 dims: [2] }]
"""
A = np.array([[0.1, 0.9, 0.3, 0.9], [0.5, -1.0, 0.0, 0.25]], np.float32)  # y = 2a + 1
B = np.array([[1, 2], [7, -9]], np.int64)  # z = b + 3
# What Triton answers for these (std::to_string values, ties by the lower index, labels by line).
Y_TOP3 = [
    [b"2.800000:1:dog", b"2.800000:3:fish", b"1.600000:2:bird"],
    [b"2.000000:0:cat", b"1.500000:3:fish", b"1.000000:2:bird"],
]
Z_TOP5 = [[b"5:1", b"4:0"], [b"10:0", b"-6:1"]]  # only 2 classes: the count is capped; no labels file


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_factory) -> ServerProcess:
    repo = tmp_path_factory.mktemp("classify")
    d = write_model(repo, "scores", affine_model(), CONFIG)
    (d / "labels.txt").write_text("cat\ndog\nbird\nfish\n")
    write_model(repo, "strings", strings_model(), "max_batch_size: 0\n")
    return server_factory(repo)


def _inputs(mod) -> list:
    a = mod.InferInput("a", list(A.shape), "FP32")
    a.set_data_from_numpy(A)
    b = mod.InferInput("b", list(B.shape), "INT64")
    b.set_data_from_numpy(B)
    return [a, b]


def _as_bytes(arr: np.ndarray) -> list:
    """tritonclient.http hands JSON BYTES back as str, binary ones as bytes: compare them alike."""
    return [[v if isinstance(v, bytes) else v.encode() for v in row] for row in arr.tolist()]


@pytest.mark.parametrize("protocol", ["grpc", "http-binary", "http-json"])
def test_class_count_answers_triton_strings(server: ServerProcess, protocol: str) -> None:
    if protocol == "grpc":
        client, mod, kw = tc.InferenceServerClient(server.grpc_url), tc, {}
    else:
        client, mod = th.InferenceServerClient(server.http_url), th
        kw = {"binary_data": protocol == "http-binary"}
    outputs = [mod.InferRequestedOutput("y", class_count=3, **kw), mod.InferRequestedOutput("z", class_count=5, **kw)]
    result = client.infer("scores", _inputs(mod), outputs=outputs)
    y, z = result.as_numpy("y"), result.as_numpy("z")
    assert y.shape == (2, 3) and z.shape == (2, 2)
    assert _as_bytes(y) == Y_TOP3 and _as_bytes(z) == Z_TOP5
    # without class_count the same output is the tensor itself
    plain = client.infer("scores", _inputs(mod), outputs=[mod.InferRequestedOutput("y", **kw)])
    np.testing.assert_array_equal(plain.as_numpy("y"), 2 * A + 1)


def test_class_count_refusals(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    s = tc.InferInput("s", [3], "BYTES")
    s.set_data_from_numpy(np.array([b"a", b"b", b"c"], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        client.infer("strings", [s], outputs=[tc.InferRequestedOutput("t", class_count=1)])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "unsupported type 'BYTES'" in err.value.message()
    http = th.InferenceServerClient(server.http_url)
    for bad in (0, -2, "3", True):
        with pytest.raises(InferenceServerException) as err:
            out = th.InferRequestedOutput("y")
            out._parameters["classification"] = bad
            http.infer("scores", _inputs(th), outputs=[out])
        assert err.value.status() == "400" and "'classification' must be a positive integer" in err.value.message()


def test_top_classes_without_batching() -> None:
    out = top_classes(np.array([3, 9, 9, 1], np.uint8), 2, batched=False, labels=["a", "b"])
    assert out.tolist() == [b"9:1:b", b"9:2"]


def test_extensions_advertised(server: ServerProcess) -> None:
    grpc_ext = set(tc.InferenceServerClient(server.grpc_url).get_server_metadata().extensions)
    http_ext = set(th.InferenceServerClient(server.http_url).get_server_metadata()["extensions"])
    assert grpc_ext == http_ext
    assert {"classification", "binary_tensor_data", "model_repository(unload_dependents)"} <= grpc_ext


@pytest.mark.slow
def test_exported_classifier_answers_class_count_with_its_labels(tmp_path: Path, server_factory) -> None:
    """The export CLI writes label_filename + labels.txt (and FORMAT_NCHW); the server answers with them."""
    pytest.importorskip("torch", reason="the export half builds the model")
    import os
    import subprocess
    import sys

    from cnncore.config import load_config
    from conftest import ROOT
    from protos.model_config_pb2 import ModelInput

    repo = tmp_path / "repo"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "onnx",
            "fashion_resnet20",
            "--repository",
            str(repo),
            "--precision",
            "fp32",
            "--runtime",
            "onnxruntime",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    model_dir = repo / "fashion_resnet20"
    cfg = load_config(model_dir)
    assert cfg.output[0].label_filename == "labels.txt" and cfg.input[0].format == ModelInput.FORMAT_NCHW
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert len(labels) == 10 and "Shirt" in labels

    srv = server_factory(repo)
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    grpc_client = tc.InferenceServerClient(srv.grpc_url)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    logits = grpc_client.infer("fashion_resnet20", [inp]).as_numpy("logits")
    expected = [
        [f"{logits[b, i]:f}:{i}:{labels[i]}".encode() for i in np.argsort(-logits[b], kind="stable")[:3]]
        for b in range(2)
    ]
    got = grpc_client.infer("fashion_resnet20", [inp], outputs=[tc.InferRequestedOutput("logits", class_count=3)])
    assert _as_bytes(got.as_numpy("logits")) == expected
    http_client = th.InferenceServerClient(srv.http_url)
    hin = th.InferInput("input", list(x.shape), "FP32")
    hin.set_data_from_numpy(x)
    got = http_client.infer("fashion_resnet20", [hin], outputs=[th.InferRequestedOutput("logits", class_count=3)])
    assert _as_bytes(got.as_numpy("logits")) == expected
