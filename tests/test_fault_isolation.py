"""Fault isolation in the real server: a backend that raises fails only its batch; one that hangs past
the model's execution_timeout_ms fails its requests and that model's readiness, while the others serve.

The faults come from tests/fault_backends.py ("test_faulty", loaded with --backend-module): a request
carrying the configured poison value makes the backend raise, or never return.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, affine_model, write_model

pytestmark = pytest.mark.timeout(120)

RAISE, HANG = -999.0, -777.0
FAULTY_CFG = f"""backend: "test_faulty"
default_model_filename: "model.onnx"
max_batch_size: 8
parameters {{ key: "fault_raise_value" value {{ string_value: "{RAISE}" }} }}
"""  # no dynamic_batching: one request per execution, so a poisoned request has its batch to itself
HANGS_CFG = f"""backend: "test_faulty"
default_model_filename: "model.onnx"
max_batch_size: 8
dynamic_batching {{ }}
parameters {{ key: "fault_hang_value" value {{ string_value: "{HANG}" }} }}
parameters {{ key: "execution_timeout_ms" value {{ string_value: "500" }} }}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("faults")
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\ndynamic_batching { }\n")
    write_model(repo, "faulty", affine_model(), FAULTY_CFG)
    write_model(repo, "hangs", affine_model(), HANGS_CFG)
    write_model(
        repo,
        "bad_timeout",
        affine_model(),
        'max_batch_size: 8\nparameters { key: "execution_timeout_ms" value { string_value: "soon" } }\n',
    )
    return repo


def _start(repo: Path, server_factory) -> ServerProcess:
    models = [arg for name in ("affine", "faulty", "hangs", "bad_timeout") for arg in ("--load-model", name)]
    # not strict: bad_timeout fails to load on purpose, and readiness here is the other models serving
    return server_factory(
        repo,
        "--backend-module",
        "fault_backends",
        "--model-control-mode",
        "explicit",
        "--strict-readiness",
        "false",
        *models,
    )


@pytest.fixture(scope="module")
def server(repo: Path, server_factory) -> ServerProcess:
    return _start(repo, server_factory)


def _inputs(first: float, n: int = 1) -> list[tc.InferInput]:
    a = np.full((n, 4), first, np.float32)
    b = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
    ins = [tc.InferInput("a", [n, 4], "FP32"), tc.InferInput("b", [n, 2], "INT64")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return ins


def test_backend_that_raises_fails_only_its_batch(server: ServerProcess) -> None:
    async def main():
        async with tca.InferenceServerClient(server.grpc_url) as c:
            calls = [c.infer("faulty", _inputs(RAISE if i % 3 == 0 else float(i))) for i in range(9)]
            return await asyncio.gather(*calls, return_exceptions=True), await c.is_model_ready("faulty")

    results, ready = asyncio.run(main())
    for i, r in enumerate(results):
        if i % 3 == 0:
            assert isinstance(r, InferenceServerException), r
            assert r.status() == "StatusCode.INTERNAL"
            assert "model 'faulty'" in r.message() and "injected fault" in r.message()
        else:
            assert not isinstance(r, BaseException), r
            np.testing.assert_array_equal(r.as_numpy("y"), np.full((1, 4), 2 * i + 1, np.float32))
    assert ready  # a raising backend is a failed batch, not a failed model


def test_hung_backend_fails_its_requests_and_readiness_and_others_keep_serving(repo: Path, server_factory) -> None:
    server = _start(repo, server_factory)  # its own: this test ends by stopping it with a thread still hung
    client = tc.InferenceServerClient(server.grpc_url)

    async def main():
        async with tca.InferenceServerClient(server.grpc_url) as c:
            hung = asyncio.create_task(c.infer("hangs", _inputs(HANG)))
            await server.wait_pending("hangs", 1)
            behind = asyncio.create_task(c.infer("hangs", _inputs(1.0, n=2)))  # queued, or refused once faulted
            return await asyncio.gather(hung, behind, return_exceptions=True)

    hung, behind = asyncio.run(main())
    assert isinstance(hung, InferenceServerException) and hung.status() == "StatusCode.INTERNAL", hung
    assert "model 'hangs'" in hung.message() and "execution_timeout_ms" in hung.message()
    assert isinstance(behind, InferenceServerException) and behind.status() == "StatusCode.UNAVAILABLE", behind
    assert "not ready" in behind.message()

    assert not client.is_model_ready("hangs")
    assert client.is_server_live() and client.is_server_ready()
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["hangs"].state == "UNAVAILABLE" and "execution_timeout_ms" in index["hangs"].reason
    with pytest.raises(InferenceServerException) as err:
        client.infer("hangs", _inputs(2.0))
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    # The other models serve, on the same event loop the hung model's thread cannot block.
    out = client.infer("affine", _inputs(3.0, n=4))
    np.testing.assert_array_equal(out.as_numpy("y"), np.full((4, 4), 7.0, np.float32))
    assert client.is_model_ready("faulty")

    # A reload brings fresh instances; the hung thread is left behind, and the process still exits.
    client.load_model("hangs")
    assert client.is_model_ready("hangs")
    out = client.infer("hangs", _inputs(1.5))
    np.testing.assert_array_equal(out.as_numpy("y"), np.full((1, 4), 4.0, np.float32))
    assert server.terminate() == 0, server.log()


def test_execution_timeout_must_be_milliseconds(server: ServerProcess) -> None:
    index = {m.name: m for m in tc.InferenceServerClient(server.grpc_url).get_model_repository_index().models}
    assert index["bad_timeout"].state == "UNAVAILABLE"
    assert "execution_timeout_ms must be a whole number of milliseconds" in index["bad_timeout"].reason
