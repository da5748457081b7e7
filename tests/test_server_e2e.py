"""End to end: the real server process on loopback, driven by unmodified tritonclient (sync and aio)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from conftest import (
    SLOW_WIDTH,
    ServerProcess,
    affine_model,
    cast_model,
    pool_model,
    slow_model,
    strings_model,
    write_model,
)
from fault_backends import FileGate

pytestmark = pytest.mark.timeout(180)

AFFINE_CFG = """name: "affine"
backend: "onnxruntime"
max_batch_size: 8
input [{ name: "a" data_type: TYPE_FP32 dims: [4] }, { name: "b" data_type: TYPE_INT64 dims: [2] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] }, { name: "z" data_type: TYPE_INT64 dims: [2] }]
dynamic_batching { max_queue_delay_microseconds: 50000 }
"""
# "slow" and "tiny_queue" stay busy while their gate (tests/fault_backends.py) is closed: the tests that
# need a request executing while others queue hold it there, however fast the machine computes.
GATED_CFG = """backend: "test_faulty"
default_model_filename: "model.onnx"
parameters {{ key: "gate_file" value {{ string_value: "{gate}" }} }}
"""
SLOW_CFG = """max_batch_size: 4
dynamic_batching { }
instance_group [{ count: 1 kind: KIND_CPU }]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "affine", affine_model(), AFFINE_CFG)
    write_model(repo, "cast", cast_model(), "max_batch_size: 4\ndynamic_batching { }\n")  # inputs auto-completed
    write_model(repo, "strings", strings_model(), "max_batch_size: 0\n")
    write_model(repo, "pool", pool_model(), "max_batch_size: 32\ndynamic_batching { }\n")
    for name, cfg in (
        ("slow", SLOW_CFG),
        ("tiny_queue", "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 1 } }\n"),
    ):
        gate = FileGate(repo / f"{name}.gate")
        gate.open()
        write_model(repo, name, slow_model(iterations=10), GATED_CFG.format(gate=gate.path) + cfg)
    gate = FileGate(repo / "gated_affine.gate")
    gate.open()
    write_model(
        repo,
        "gated_affine",
        affine_model(),
        GATED_CFG.format(gate=gate.path)
        + AFFINE_CFG.replace('name: "affine"\n', "").replace('backend: "onnxruntime"\n', "")
        + "instance_group [{ count: 1 kind: KIND_CPU }]\n",
    )
    write_model(repo, "versioned", affine_model(), "max_batch_size: 8\n", versions=(1, 2))
    write_model(repo, "broken", b"this is not an onnx file", "max_batch_size: 4\n")
    write_model(repo, "badconfig", affine_model(), "max_batch_size: 8\ndynamic_batching { max_delay: 5 }\n")
    write_model(
        repo,
        "needs_trt",
        affine_model(),
        "max_batch_size: 8\noptimization { execution_accelerators {"
        ' gpu_execution_accelerator [{ name: "tensorrt" }] } }\n',
    )
    write_model(repo, "needs_gpu", affine_model(), "max_batch_size: 8\ninstance_group [{ kind: KIND_GPU }]\n")
    write_model(
        repo,
        "badparam",
        affine_model(),
        'max_batch_size: 8\nparameters { key: "intra_op_thread_count" value { string_value: "two" } }\n',
    )
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, server_factory) -> ServerProcess:
    # explicit mode: test_unload_and_load drives the repository API (mode none refuses it, as Triton);
    # not strict: the repository holds models that fail to load on purpose, and the server serves the rest
    return server_factory(
        repo,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
        "--strict-readiness",
        "false",
        "--backend-module",
        "fault_backends",
    )


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(server.grpc_url)


def _ort(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)


def _input(name: str, arr: np.ndarray, datatype: str) -> tc.InferInput:
    i = tc.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr)
    return i


def _affine_inputs(n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(-50, 50, (n, 2)).astype(np.int64)


def _stats(client: tc.InferenceServerClient, model: str):
    return client.get_inference_statistics(model).model_stats[0]


def _scrape(server: ServerProcess) -> dict[tuple[str, tuple], float]:
    return server.scrape()


# -- health, metadata, config -----------------------------------------------------------------------
def test_health_and_server_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "cnnserve" and "model_repository" in meta.extensions
    assert client.is_model_ready("affine")
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("no_such_model")


def test_grpc_health_and_reflection(server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.grpc_url) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "inference.GRPCInferenceService"):
            # types-grpcio-health-checking's HealthStub declares no methods (grpc sets them per instance)
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)  # type: ignore[attr-defined]
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert "inference.GRPCInferenceService" in services
        assert "grpc.health.v1.Health" in services


def test_model_metadata_and_config(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("affine")
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("a", "FP32", [-1, 4]),
        ("b", "INT64", [-1, 2]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("y", "FP32", [-1, 4]),
        ("z", "INT64", [-1, 2]),
    ]
    cfg = client.get_model_config("affine").config
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 50000
    # Inputs the config left out are completed from the ONNX graph (what perf_analyzer reads).
    cast = client.get_model_config("cast").config
    assert [(i.name, list(i.dims)) for i in cast.input] == [("x", [2, 3])]
    assert cast.input[0].data_type == 2  # TYPE_UINT8
    assert cast.output[0].data_type == 10  # TYPE_FP16


def test_repository_index_reports_broken_models_with_reasons(client: tc.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["affine"].state == "READY"
    assert index["broken"].state == "UNAVAILABLE" and "broken/1/model.onnx" in index["broken"].reason
    assert index["badconfig"].state == "UNAVAILABLE"
    assert "config.pbtxt:2:" in index["badconfig"].reason and "max_delay" in index["badconfig"].reason
    # Accelerators this onnxruntime build lacks fail that model with a clear reason (no silent CPU fallback).
    assert "TensorrtExecutionProvider" in index["needs_trt"].reason
    assert "CUDAExecutionProvider" in index["needs_gpu"].reason
    assert "intra_op_thread_count must be an integer" in index["badparam"].reason


# -- inference equals in-process ONNX Runtime --------------------------------------------------------
def test_inference_matches_onnxruntime_sync(client: tc.InferenceServerClient) -> None:
    a, b = _affine_inputs(3)
    r = client.infer("affine", [_input("a", a, "FP32"), _input("b", b, "INT64")], request_id="r1")
    y, z = _ort(affine_model(), {"a": a, "b": b})
    np.testing.assert_array_equal(r.as_numpy("y"), y)
    np.testing.assert_array_equal(r.as_numpy("z"), z)
    assert r.get_response().id == "r1"

    x = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    out = client.infer("cast", [_input("x", x, "UINT8")]).as_numpy("y")
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, _ort(cast_model(), {"x": x})[0])

    s = np.array([b"hello", b"", "caf\u00e9".encode()], dtype=np.object_)
    t = client.infer("strings", [_input("s", s, "BYTES")]).as_numpy("t")
    assert list(t) == list(s)


def test_default_message_limit_fits_a_32_image_batch(client: tc.InferenceServerClient) -> None:
    x = np.random.default_rng(0).random((32, 3, 224, 224), dtype=np.float32)  # 19.3 MB
    y = client.infer("pool", [_input("x", x, "FP32")]).as_numpy("y")
    np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-6)


def test_requested_output_subset(client: tc.InferenceServerClient) -> None:
    a, b = _affine_inputs(2, 1)
    r = client.infer(
        "affine", [_input("a", a, "FP32"), _input("b", b, "INT64")], outputs=[tc.InferRequestedOutput("z")]
    )
    assert r.as_numpy("y") is None
    np.testing.assert_array_equal(r.as_numpy("z"), b + 3)


def test_typed_contents_are_accepted(server: ServerProcess) -> None:
    a, b = _affine_inputs(2, 3)
    req = tpb.ModelInferRequest(model_name="affine")
    ia = req.inputs.add(name="a", datatype="FP32", shape=[2, 4])
    ia.contents.fp32_contents.extend(a.reshape(-1).tolist())
    ib = req.inputs.add(name="b", datatype="INT64", shape=[2, 2])
    ib.contents.int64_contents.extend(b.reshape(-1).tolist())
    with grpc.insecure_channel(server.grpc_url) as ch:
        resp = tpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert [o.name for o in resp.outputs] == ["y", "z"]
    y = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(resp.outputs[0].shape))
    np.testing.assert_array_equal(y, a * 2 + 1)


def test_inference_aio_and_stream(server: ServerProcess) -> None:
    async def main():
        async with tca.InferenceServerClient(server.grpc_url) as c:
            a, b = _affine_inputs(5, 4)
            r = await c.infer("affine", [_input("a", a, "FP32"), _input("b", b, "INT64")])
            np.testing.assert_array_equal(r.as_numpy("y"), a * 2 + 1)

            async def requests():
                for i in range(4):
                    a, b = _affine_inputs(1 + i, 10 + i)
                    yield {
                        "model_name": "affine",
                        "inputs": [_input("a", a, "FP32"), _input("b", b, "INT64")],
                        "request_id": str(i),
                    }
                yield {"model_name": "no_such_model", "inputs": [_input("a", a, "FP32")], "request_id": "bad"}

            got, errors = {}, []
            async for result, error in c.stream_infer(requests()):
                if error is not None:
                    errors.append(str(error))
                else:
                    got[result.get_response().id] = result.as_numpy("y")
                if len(got) + len(errors) == 5:
                    break
            return got, errors

    got, errors = asyncio.run(main())
    for i in range(4):
        a, _ = _affine_inputs(1 + i, 10 + i)
        np.testing.assert_array_equal(got[str(i)], a * 2 + 1)
    assert len(errors) == 1 and "no_such_model" in errors[0]


def test_versions_latest_policy(client: tc.InferenceServerClient) -> None:
    assert list(client.get_model_metadata("versioned").versions) == ["2"]
    a, b = _affine_inputs(1)
    r = client.infer("versioned", [_input("a", a, "FP32"), _input("b", b, "INT64")], model_version="2")
    assert r.get_response().model_version == "2"
    with pytest.raises(InferenceServerException) as err:
        client.infer("versioned", [_input("a", a, "FP32"), _input("b", b, "INT64")], model_version="1")
    assert err.value.status() == "StatusCode.NOT_FOUND"


# -- the bad-input matrix ------------------------------------------------------------------------------
def _raw_request(**over) -> tpb.ModelInferRequest:
    a, b = _affine_inputs(2, 5)
    req = tpb.ModelInferRequest(model_name="affine")
    req.inputs.add(name="a", datatype="FP32", shape=[2, 4])
    req.inputs.add(name="b", datatype="INT64", shape=[2, 2])
    req.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    for k, v in over.items():
        v(req) if callable(v) else setattr(req, k, v)
    return req


def _as_fp64(r: tpb.ModelInferRequest) -> None:
    r.inputs[0].datatype = "FP64"
    r.raw_input_contents[0] = np.zeros((2, 4)).tobytes()


BAD_REQUESTS = {
    "unknown model": (_raw_request(model_name="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "unknown version": (_raw_request(model_version="7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
    "wrong datatype": (
        _raw_request(x=_as_fp64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'a': expected datatype FP32, got FP64",
    ),
    "unknown datatype": (
        _raw_request(x=(lambda r: setattr(r.inputs[0], "datatype", "FP33"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unsupported datatype 'FP33'",
    ),
    "wrong shape": (
        _raw_request(x=(lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([4, 2])))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'a': expected shape [-1, 4], got [4, 2]",
    ),
    "byte size": (
        _raw_request(x=(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 20))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'a': expected 32 bytes for FP32 [2, 4], got 20 bytes",
    ),
    "batch over max": (
        _raw_request(
            x=(
                lambda r: (
                    r.inputs[0].ClearField("shape"),
                    r.inputs[0].shape.extend([9, 4]),
                    r.raw_input_contents.__setitem__(0, b"\0" * 144),
                )
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch size 9 exceeds max_batch_size 8",
    ),
    "missing input": (
        _raw_request(x=(lambda r: (r.inputs.pop(), r.raw_input_contents.pop()))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing input(s) 'b'",
    ),
    "extra input": (
        _raw_request(
            x=(
                lambda r: (
                    r.inputs.add(name="c", datatype="FP32", shape=[2, 1]),
                    r.raw_input_contents.append(b"\0" * 8),
                )
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected input(s) 'c'",
    ),
    "mismatched batch": (
        _raw_request(
            x=(
                lambda r: (
                    r.inputs[1].ClearField("shape"),
                    r.inputs[1].shape.extend([1, 2]),
                    r.raw_input_contents.__setitem__(1, b"\0" * 16),
                )
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch size 1 differs",
    ),
    "raw count": (
        _raw_request(x=(lambda r: r.raw_input_contents.pop())),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents has 1 entries for 2 inputs",
    ),
    "negative dim": (
        _raw_request(x=(lambda r: r.inputs[0].shape.__setitem__(0, -2))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "negative dimension",
    ),
    "unknown output": (
        _raw_request(x=(lambda r: r.outputs.add(name="w"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "requested output 'w' does not exist",
    ),
    "broken model": (_raw_request(model_name="broken"), grpc.StatusCode.UNAVAILABLE, "not ready"),
    "timeout not an int": (
        _raw_request(x=(lambda r: setattr(r.parameters["timeout"], "string_param", "soon"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "parameter 'timeout' must be an integer",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_matrix(server: ServerProcess, client: tc.InferenceServerClient, case: str) -> None:
    req, code, fragment = BAD_REQUESTS[case]
    with grpc.insecure_channel(server.grpc_url) as ch, pytest.raises(grpc.RpcError) as err:
        tpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert fragment in (err.value.details() or ""), err.value.details()
    # ... and the server keeps serving.
    a, b = _affine_inputs(1, 6)
    r = client.infer("affine", [_input("a", a, "FP32"), _input("b", b, "INT64")])
    np.testing.assert_array_equal(r.as_numpy("y"), a * 2 + 1)


def test_malformed_request_bytes(server: ServerProcess, client: tc.InferenceServerClient) -> None:
    with grpc.insecure_channel(server.grpc_url) as ch:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(  # bytes in, bytes out
            "/inference.GRPCInferenceService/ModelInfer"
        )
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\x05ab", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ModelInferRequest" in (err.value.details() or "")
    assert client.is_server_ready()


def test_bad_bytes_tensors(client: tc.InferenceServerClient, server: ServerProcess) -> None:
    req = tpb.ModelInferRequest(model_name="strings")
    req.inputs.add(name="s", datatype="BYTES", shape=[3])
    req.raw_input_contents.append(b"\x05\x00\x00\x00abc")  # declares 5 bytes, carries 3
    with grpc.insecure_channel(server.grpc_url) as ch, pytest.raises(grpc.RpcError) as err:
        tpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "overruns" in (err.value.details() or "")
    assert client.is_server_ready()


# -- batching, deadlines, metrics -------------------------------------------------------------------
def test_concurrent_requests_are_batched(repo: Path, server: ServerProcess, client: tc.InferenceServerClient) -> None:
    # While the one instance is held executing the first request, the other 23 queue; when it is let go
    # they must leave the queue in full batches. Ordered by the gate and the pending gauge, not by time.
    before = _stats(client, "gated_affine")
    n = 24
    gate = FileGate(repo / "gated_affine.gate")

    async def main():
        async with tca.InferenceServerClient(server.grpc_url) as c:

            async def one(i: int):
                a, b = _affine_inputs(1, 100 + i)
                r = await c.infer("gated_affine", [_input("a", a, "FP32"), _input("b", b, "INT64")])
                return a, r.as_numpy("y")

            await c.is_server_ready()
            gate.close()
            try:
                first = asyncio.create_task(one(0))
                await asyncio.to_thread(gate.wait_entered, 1)
                rest = [asyncio.create_task(one(i)) for i in range(1, n)]
                await server.wait_pending("gated_affine", n)
            finally:
                gate.open()
            return await asyncio.gather(first, *rest)

    for a, y in asyncio.run(main()):
        np.testing.assert_array_equal(y, a * 2 + 1)
    after = _stats(client, "gated_affine")
    requests = after.inference_stats.success.count - before.inference_stats.success.count
    executions = after.execution_count - before.execution_count
    assert requests == n
    assert executions < n / 2, f"{n} concurrent requests ran in {executions} executions"
    assert any(b.batch_size > 1 for b in after.batch_stats)


def test_request_whose_deadline_passes_in_queue_is_not_executed(
    repo: Path, server: ServerProcess, client: tc.InferenceServerClient
) -> None:
    before = _stats(client, "slow")
    before_metrics = _scrape(server)
    x1, x2 = (
        np.ones((1, SLOW_WIDTH), np.float32),
        np.ones((2, SLOW_WIDTH), np.float32),
    )  # different shapes: never co-batched
    gate = FileGate(repo / "slow.gate")
    key = ("cnnserve_inference_request_never_executed", (("model", "slow"), ("version", "1")))

    async def main():
        async with tca.InferenceServerClient(server.grpc_url) as c:
            await c.is_server_ready()  # connect first: request arrival order must be the sending order
            gate.close()
            try:
                first = asyncio.create_task(c.infer("slow", [_input("x", x1, "FP32")]))
                await asyncio.to_thread(gate.wait_entered, 1)  # executing, held; the next ones queue behind it
                # One with a gRPC deadline, one with the protocol's `timeout` parameter (microseconds).
                late = [
                    c.infer("slow", [_input("x", x2, "FP32")], **kw)
                    for kw in ({"client_timeout": 0.03}, {"timeout": 30_000})
                ]
                results = await asyncio.gather(*late, return_exceptions=True)
                # The server drops the abandoned request when it notices the cancellation: wait for that.
                while (await asyncio.to_thread(_scrape, server)).get(key, 0) - before_metrics.get(key, 0) < 2:
                    await asyncio.sleep(0.005)
            finally:
                gate.open()
            await first
            return results

    errors = asyncio.run(main())
    assert all(isinstance(e, InferenceServerException) for e in errors), errors
    assert [e.status() for e in errors] == ["StatusCode.DEADLINE_EXCEEDED"] * 2, [str(e) for e in errors]
    assert "in the queue, not executed" in errors[1].message()  # it was queued, then dropped
    after = _stats(client, "slow")
    assert after.inference_count - before.inference_count == 1  # only the first request ran
    assert after.execution_count - before.execution_count == 1
    m = _scrape(server)
    assert m[key] - before_metrics.get(key, 0) == 2


def test_queue_full_is_resource_exhausted(repo: Path, server: ServerProcess, client: tc.InferenceServerClient) -> None:
    x = np.ones((1, SLOW_WIDTH), np.float32)
    gate = FileGate(repo / "tiny_queue.gate")

    async def main():
        async with tca.InferenceServerClient(server.grpc_url) as c:
            await c.is_server_ready()  # connect first: request arrival order must be the sending order
            gate.close()
            try:
                first = asyncio.create_task(c.infer("tiny_queue", [_input("x", x, "FP32")]))
                await asyncio.to_thread(gate.wait_entered, 1)  # executing, held; the queue (size 1) is empty
                second = asyncio.create_task(c.infer("tiny_queue", [_input("x", x, "FP32")]))
                await server.wait_pending("tiny_queue", 2)  # queued behind it: the queue is full
                try:
                    await c.infer("tiny_queue", [_input("x", x, "FP32")])
                    third = None
                except InferenceServerException as exc:
                    third = exc
                second_waiting = not second.done()
            finally:
                gate.open()
            return await first, await second, third, second_waiting

    first, second, third, second_waiting = asyncio.run(main())
    assert first.as_numpy("y").shape == (1, SLOW_WIDTH) and second.as_numpy("y").shape == (1, SLOW_WIDTH)
    assert third is not None and third.status() == "StatusCode.RESOURCE_EXHAUSTED", third
    assert "queue is full" in third.message()
    assert second_waiting  # rejected at once, while the queued request still waited


def test_metrics_scrape_parses_and_moves(server: ServerProcess, client: tc.InferenceServerClient) -> None:
    lab = (("model", "affine"), ("version", "1"))
    before = _scrape(server)
    a, b = _affine_inputs(3, 7)
    for _ in range(3):
        client.infer("affine", [_input("a", a, "FP32"), _input("b", b, "INT64")])
    with pytest.raises(InferenceServerException):
        client.infer("affine", [_input("a", a, "FP32")])  # missing input
    after = _scrape(server)
    assert after[("nv_inference_request_success", lab)] - before.get(("nv_inference_request_success", lab), 0) == 3
    assert after[("nv_inference_count", lab)] - before.get(("nv_inference_count", lab), 0) == 9
    fail = ("nv_inference_request_failure", (("model", "affine"), ("reason", "INVALID"), ("version", "1")))
    assert after[fail] - before.get(fail, 0) == 1
    for name in (
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_inference_pending_request_count",
    ):
        assert (name, lab) in after, name
    assert after[("nv_inference_compute_infer_duration_us", lab)] > before.get(
        ("nv_inference_compute_infer_duration_us", lab), 0
    )
    hist = ("cnnserve_request_latency_seconds_count", lab)
    assert after[hist] - before.get(hist, 0) == 3
    for bucket in ("cnnserve_batch_size_bucket", "cnnserve_queue_time_seconds_bucket"):
        assert any(k[0] == bucket and dict(k[1]).get("model") == "affine" for k in after), bucket


# -- repository control ----------------------------------------------------------------------------
def test_unload_and_load(client: tc.InferenceServerClient) -> None:
    client.unload_model("cast")
    assert not client.is_model_ready("cast")
    with pytest.raises(InferenceServerException) as err:
        client.infer("cast", [_input("x", np.zeros((1, 2, 3), np.uint8), "UINT8")])
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    client.load_model("cast")
    assert client.is_model_ready("cast")
    with pytest.raises(InferenceServerException) as err:
        client.load_model("broken")
    assert "broken/1/model.onnx" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.load_model("../etc")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "not a directory name" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.load_model("not_in_the_repository")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "not found" in err.value.message()
    assert client.is_model_ready("affine")
