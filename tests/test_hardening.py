"""Regression tests for what a hostile client found (issue 13), against the real server process:
versions of Unicode digits or thousands of digits, 10 KB model names, failed loads that left names
behind, a 60 MB BYTES tensor sent to an FP32 model, and the server-wide admission limit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, affine_model, write_model
from fault_backends import FileGate

pytestmark = pytest.mark.timeout(180)

STOCK_CLIENT_METADATA_LIMIT = 8 * 1024  # what grpc clients accept in a status message (trailing metadata)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("hardening")
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\ndynamic_batching { }\n")
    gate = FileGate(repo / "gated.gate")
    gate.open()
    write_model(
        repo,
        "gated",
        affine_model(),
        f'backend: "test_faulty"\ndefault_model_filename: "model.onnx"\nmax_batch_size: 8\n'
        f'parameters {{ key: "gate_file" value {{ string_value: "{gate.path}" }} }}\n',
    )
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, server_factory) -> ServerProcess:
    return server_factory(
        repo,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "affine",
        "--load-model",
        "gated",
        "--backend-module",
        "fault_backends",
    )


@pytest.fixture(scope="module")
def stub(server: ServerProcess):
    with grpc.insecure_channel(server.grpc_url) as ch:
        yield tpb_grpc.GRPCInferenceServiceStub(ch)


def _affine_request(model_version: str = "", name: str = "affine") -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name=name, model_version=model_version)
    req.inputs.add(name="a", datatype="FP32", shape=[1, 4])
    req.inputs.add(name="b", datatype="INT64", shape=[1, 2])
    req.raw_input_contents.extend([np.ones((1, 4), np.float32).tobytes(), np.ones((1, 2), np.int64).tobytes()])
    return req


def _error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=30)
    return err.value


@pytest.mark.parametrize("version", ["²", "①", "٣", "9" * 5000, "9223372036854775808", "-1", " 1"])
def test_malformed_versions_are_invalid_argument(stub, version: str) -> None:
    for call, request in (
        (stub.ModelInfer, _affine_request(version)),
        (stub.ModelMetadata, tpb.ModelMetadataRequest(name="affine", version=version)),
        (stub.ModelConfig, tpb.ModelConfigRequest(name="affine", version=version)),
    ):
        err = _error(call, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), str(err.details())[:200])
        assert "model version" in str(err.details()) and len(str(err.details())) < 400
    assert not stub.ModelReady(tpb.ModelReadyRequest(name="affine", version=version), timeout=30).ready


def test_well_formed_versions_resolve_or_are_not_found(stub) -> None:
    assert stub.ModelInfer(_affine_request("0001"), timeout=30).model_version == "1"
    err = _error(stub.ModelInfer, _affine_request("9223372036854775807"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no version" in str(err.details())


def test_ten_kilobyte_names_get_a_short_clear_status(server: ServerProcess, stub) -> None:
    name = "m" * 10_000
    client = tc.InferenceServerClient(server.grpc_url)
    for call, code in (
        (lambda: client.load_model(name), "StatusCode.INVALID_ARGUMENT"),
        (lambda: client.unload_model(name), "StatusCode.INVALID_ARGUMENT"),
        (lambda: client.get_model_metadata(name), "StatusCode.NOT_FOUND"),
        (lambda: client.infer(name, [tc.InferInput("a", [1], "FP32")]), "StatusCode.NOT_FOUND"),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == code, (err.value.status(), err.value.message()[:200])
        assert len(err.value.message().encode()) < STOCK_CLIENT_METADATA_LIMIT
        assert "10000 characters" in err.value.message()
    for bad in ("../affine", ".hidden", "a\x00b", ""):
        with pytest.raises(InferenceServerException) as err:
            client.load_model(bad)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", (bad, err.value.message())
    assert client.is_server_ready()


def test_failed_loads_of_names_not_on_disk_leave_no_trace(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    before = [(m.name, m.state) for m in client.get_model_repository_index().models]
    for i in range(50):
        with pytest.raises(InferenceServerException) as err:
            client.load_model(f"ghost_{i}")
        assert err.value.status() == "StatusCode.NOT_FOUND", err.value.message()
    assert [(m.name, m.state) for m in client.get_model_repository_index().models] == before
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("ghost_0")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.unload_model("ghost_0")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert not client.is_model_ready("ghost_0")


def test_sixty_megabyte_bytes_tensor_to_an_fp32_model_is_refused_before_decoding(server: ServerProcess, stub) -> None:
    # 60 MB of 1-byte BYTES elements (4-byte length + 1 byte each) declared for the FP32 input.
    n = 12_000_000
    req = tpb.ModelInferRequest(model_name="affine")
    req.inputs.add(name="a", datatype="BYTES", shape=[n // 4, 4])
    req.inputs.add(name="b", datatype="INT64", shape=[n // 4, 2])
    req.raw_input_contents.extend([b"\x01\x00\x00\x00x" * n, b""])
    rss_before = server.rss_bytes()
    err = _error(stub.ModelInfer, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = str(err.details())
    assert "'a'" in detail and "FP32" in detail and "BYTES" in detail, detail
    # Decoding 12M elements built a 1.4 GiB server; refusing on the declaration holds little beyond the
    # received message itself.
    grown = server.rss_bytes() - rss_before
    assert grown < 300 * 2**20, f"server RSS grew {grown / 2**20:.0f} MiB for one refused request"
    assert stub.ServerLive(tpb.ServerLiveRequest(), timeout=30).live


def _admission_server(repo: Path, server_factory, *limits: str) -> ServerProcess:
    return server_factory(
        repo,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "gated",
        "--backend-module",
        "fault_backends",
        "--retry-pushback-ms",
        "250",
        *limits,
    )


@asynccontextmanager
async def _two_held_at_the_gate(srv: ServerProcess, stub, req, gate: FileGate) -> AsyncIterator[list]:
    """Two requests admitted and held executing at the closed gate for the block (the server's pending
    gauge says so); the gate opens on leaving. Yields their calls, to be awaited after."""
    await stub.ServerReady(tpb.ServerReadyRequest())
    gate.close()
    try:
        held = [asyncio.ensure_future(stub.ModelInfer(req)) for _ in range(2)]
        await srv.wait_pending("gated", 2)
        yield held
    finally:
        gate.open()


@pytest.mark.parametrize("limit", ["requests", "bytes"])
def test_admission_limit_refuses_with_retry_pushback_and_counts(repo: Path, server_factory, limit: str) -> None:
    req = _affine_request(name="gated")
    size = req.ByteSize()  # what the server counts: the message as received
    flags = (
        ("--max-inflight-requests", "2") if limit == "requests" else ("--max-inflight-bytes", str(2 * size + size // 2))
    )
    srv = _admission_server(repo, server_factory, *flags)
    gate = FileGate(repo / "gated.gate")

    async def main():
        async with grpc.aio.insecure_channel(srv.grpc_url) as ch:
            s = tpb_grpc.GRPCInferenceServiceStub(ch)
            async with _two_held_at_the_gate(srv, s, req, gate) as held:
                call = s.ModelInfer(req)
                try:
                    await call
                    refused = None
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                trailers = await call.trailing_metadata()
            answers = await asyncio.gather(*held)
            return refused, trailers, answers

    refused, trailers, answers = asyncio.run(main())
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert limit in refused.details()
    assert dict(trailers)["grpc-retry-pushback-ms"] == "250"
    assert len(answers) == 2 and all(a.model_name == "gated" for a in answers)  # no accepted request lost
    m = srv.scrape()
    assert m[("cnnserve_admission_refused_total", (("limit", limit),))] == 1
    assert m[("cnnserve_inflight_requests", ())] == 0
    srv.terminate()


def test_admission_refusal_inside_a_stream_answers_that_request(repo: Path, server_factory) -> None:
    # A refused stream request was dropped unanswered: its refusal ended its task before the
    # per-request error handling, so the client waited for a response that never came.
    req = _affine_request(name="gated")
    req.id = "refused"
    srv = _admission_server(repo, server_factory, "--max-inflight-requests", "2")
    gate = FileGate(repo / "gated.gate")

    async def main():
        async with grpc.aio.insecure_channel(srv.grpc_url) as ch:
            s = tpb_grpc.GRPCInferenceServiceStub(ch)
            async with _two_held_at_the_gate(srv, s, req, gate) as held:
                stream = s.ModelStreamInfer()
                await stream.write(req)
                answer = await asyncio.wait_for(stream.read(), 30)
                await stream.done_writing()
            await asyncio.gather(*held)
            return answer

    answer = asyncio.run(main())
    assert answer.infer_response.id == "refused"
    assert "in-flight requests" in answer.error_message, answer
    assert srv.scrape()[("cnnserve_admission_refused_total", (("limit", "requests"),))] == 1
    srv.terminate()


def test_unparsable_message_in_a_stream_is_invalid_argument(server: ServerProcess) -> None:
    # The stream waited for an end mark its reader never sent after the parse error: the call hung
    # until the client's deadline instead of being answered.
    with grpc.insecure_channel(server.grpc_url) as ch:
        call: grpc.StreamStreamMultiCallable[bytes, bytes] = ch.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer"
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([b"\x00"]), timeout=20))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), str(err.value.details()))
    assert "malformed request message" in str(err.value.details())


@pytest.mark.parametrize("flag", ["--max-inflight-requests", "--max-inflight-bytes", "--retry-pushback-ms"])
def test_negative_admission_flags_are_refused_with_a_clear_error(repo: Path, flag: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(repo), flag, "-1"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert f"{flag} must be >= 0, got -1" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_vision_threads_below_one_are_refused_with_a_clear_error(repo: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(repo), "--vision-threads", "0"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert "--vision-threads must be at least 1, got 0" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "method",
    [
        "/inference.GRPCInferenceService/ModelMetadata",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/cnnserve.vision.VisionService/Classify",
    ],
)
def test_unparsable_request_messages_are_invalid_argument(server: ServerProcess, method: str) -> None:
    # Found by the fuzzer: gRPC answered its deserializer's DecodeError UNKNOWN.
    with grpc.insecure_channel(server.grpc_url) as ch:
        err = _error(ch.unary_unary(method), b"\x00")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), str(err.details()))
    assert "malformed request message" in str(err.details())
