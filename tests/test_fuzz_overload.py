"""Hostile and heavy clients against the real server: fuzzed ModelInfer bytes, REST requests (bodies,
encodings, headers, JSON documents) and vision requests get only well-defined statuses from a server
that stays live; an overload burst on an exported config is
bounded by its queue and loses no accepted request; repeated bursts do not grow the server's memory.

Hypothesis runs derandomized with bounded examples (the same inputs every run, a few seconds each);
a failure prints the minimal request that broke the server.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import io
import json
import zlib
from pathlib import Path

import brotli
import grpc
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from PIL import Image
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from cnncore.config import render_config
from conftest import ServerProcess, affine_model, strings_model, write_model
from fault_backends import FileGate
from protos import vision_pb2 as vpb
from protos import vision_pb2_grpc as vpb_grpc
from vision_synthetic import build_synthetic_repository

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# What a bad request may be answered with: each names a client mistake or a server state the client
# can act on. INTERNAL and UNKNOWN would be server bugs; a dead server fails the liveness check.
WELL_DEFINED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
VISION_WELL_DEFINED = WELL_DEFINED | {grpc.StatusCode.FAILED_PRECONDITION}  # e.g. Detect on a classifier
DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
    "FP33",
    "",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_factory) -> ServerProcess:
    repo = build_synthetic_repository(tmp_path_factory.mktemp("fuzz"))
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\ndynamic_batching { }\n")
    write_model(repo, "strings", strings_model(), "max_batch_size: 0\n")
    return server_factory(repo)


@pytest.fixture(scope="module")
def channel(server: ServerProcess):
    with grpc.insecure_channel(server.grpc_url) as ch:
        yield ch


def _code(call, payload) -> grpc.StatusCode:
    try:
        call(payload, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in WELL_DEFINED | VISION_WELL_DEFINED, (exc.code(), str(exc.details())[:300])
        assert len(str(exc.details()).encode()) < 8192, "status message longer than clients accept"
        return exc.code()
    return grpc.StatusCode.OK


def _assert_live(channel) -> None:
    stub = tpb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(tpb.ServerLiveRequest(), timeout=30).live
    assert stub.ServerReady(tpb.ServerReadyRequest(), timeout=30).ready


# -- ModelInfer: raw bytes, and well-formed messages with hostile contents ----------------------------------
@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_model_infer_raw_bytes(channel, data: bytes) -> None:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    code = _code(call, data)
    assert code in WELL_DEFINED


def _valid_affine(n: int) -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name="affine")
    req.inputs.add(name="a", datatype="FP32", shape=[n, 4])
    req.inputs.add(name="b", datatype="INT64", shape=[n, 2])
    req.raw_input_contents.extend([np.ones((n, 4), np.float32).tobytes(), np.ones((n, 2), np.int64).tobytes()])
    return req


tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "s", "c", ""]) | st.text(max_size=20),
        "datatype": st.sampled_from(DATATYPES),
        "shape": st.lists(st.integers(min_value=-3, max_value=2**40) | st.integers(0, 9), max_size=4),
        "raw": st.none() | st.binary(max_size=512),
    }
)


@st.composite
def infer_messages(draw) -> bytes:
    req = tpb.ModelInferRequest(
        model_name=draw(
            st.sampled_from(["affine", "strings", "colour_classifier", "nope", ""]) | st.text(max_size=300)
        ),
        model_version=draw(st.sampled_from(["", "1", "²", "①", "9" * 5000, "-1", "0"]) | st.text(max_size=30)),
    )
    raws = []
    for t in draw(st.lists(tensor, max_size=4)):
        req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        raws.append(t["raw"])
    if raws and all(r is not None for r in raws) and draw(st.booleans()):
        req.raw_input_contents.extend(raws)
    elif req.inputs and draw(st.booleans()):
        req.inputs[0].contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=16)))
        req.inputs[0].contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=4)))
    for o in draw(st.lists(st.sampled_from(["y", "z", "t", "w"]), max_size=3)):
        req.outputs.add(name=o)
    if draw(st.booleans()):
        which = draw(st.sampled_from(["int64_param", "string_param", "bool_param", "uint64_param"]))
        value = {
            "int64_param": draw(st.integers(-(2**63), 2**63 - 1)),
            "string_param": "soon",
            "bool_param": True,
            "uint64_param": draw(st.integers(0, 2**64 - 1)),
        }[which]
        setattr(req.parameters["timeout"], which, value)
    data = req.SerializeToString()
    cut = draw(st.none() | st.integers(0, max(0, len(data) - 1)))
    return data if cut is None else data[:cut]


@FUZZ
@given(infer_messages())
def test_fuzz_model_infer_messages(channel, data: bytes) -> None:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    assert _code(call, data) in WELL_DEFINED


def test_server_survives_the_fuzzing(channel) -> None:
    _assert_live(channel)
    out = tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_valid_affine(3), timeout=30)
    np.testing.assert_array_equal(np.frombuffer(out.raw_output_contents[0], np.float32), np.full(12, 3.0, np.float32))


# -- the REST binding: hostile bodies, headers and JSON documents -------------------------------------------
REST_FUZZ = settings(FUZZ, max_examples=200)
# What a bad REST request may be answered with (the HTTP twins of WELL_DEFINED, plus what only HTTP has:
# 413 too large, 415 an encoding or charset not taken). A 500 would be a server bug.
REST_WELL_DEFINED = {200, 400, 404, 413, 415, 429, 503}
json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
rest_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "x", ""]) | st.text(max_size=10),
        "datatype": st.sampled_from(DATATYPES),
        "shape": st.lists(st.integers(-2, 2**40) | st.integers(0, 6), max_size=4) | json_value,
    },
    optional={
        "data": st.lists(
            st.integers(-(2**65), 2**65)
            | st.floats()
            | st.none()
            | st.booleans()
            | st.text(max_size=3)
            | st.lists(st.integers(-300, 300), max_size=3),
            max_size=10,
        )
        | json_value,
        "parameters": st.fixed_dictionaries(
            {},
            optional={
                "binary_data_size": st.integers(-5, 2**64) | json_value,
                "shared_memory_region": st.sampled_from(["r", ""]) | json_value,
                "shared_memory_byte_size": st.integers(-1, 2**65) | json_value,
                "shared_memory_offset": st.integers(-1, 2**65),
            },
        ),
    },
)


@st.composite
def rest_requests(draw) -> tuple[str, bytes, dict[str, str]]:
    path = draw(
        st.sampled_from(
            [
                "/v2/models/affine/infer",
                "/v2/models/strings/infer",
                "/v2/models/nope/infer",
                "/v2/models/affine/versions/1/infer",
                "/v2/systemsharedmemory/region/r/register",
                "/v2/repository/index",
                "/v2/vision/models/colour_classifier/classify",
            ]
        )
    )
    doc = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "inputs": st.lists(rest_tensor, max_size=3) | json_value,
                "outputs": st.lists(
                    st.fixed_dictionaries(
                        {"name": st.sampled_from(["y", "z", "t"]) | json_value}, optional={"parameters": json_value}
                    ),
                    max_size=2,
                ),
                "parameters": st.dictionaries(
                    st.sampled_from(["timeout", "binary_data_output", "priority"]), json_value
                ),
                "id": json_value,
                "key": st.text(max_size=10),
                "byte_size": st.integers(-1, 2**65),
                "offset": json_value,
            },
        )
    )
    body = json.dumps(doc).encode()
    # the tokens Python's json would accept and RFC 8259 does not, and cuts / binary tails
    mangle = draw(st.sampled_from(["", "nan", "cut", "tail", "bytes"]))
    if mangle == "nan":
        body = body.replace(b"null", b"NaN", 1).replace(b"0.0", b"-Infinity", 1)
    elif mangle == "cut":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif mangle == "tail":
        body += draw(st.binary(max_size=64))
    elif mangle == "bytes":
        body = draw(st.binary(max_size=512))
    headers = {
        "Content-Type": draw(
            st.sampled_from(
                [
                    "application/json",
                    "application/octet-stream",
                    "text/plain",
                    "application/json; charset=latin-1",
                    "image/png",
                    "multipart/form-data; boundary=x",
                    "application/xml",
                ]
            )
        )
    }
    encoding = draw(st.sampled_from(["", "gzip", "deflate", "br", "gzip, deflate", "zstd", "identity"]))
    if encoding:
        headers["Content-Encoding"] = encoding
        if draw(st.booleans()):  # encoded as it says (else the plain body under the label)
            for coding in encoding.split(", "):
                body = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}.get(coding, bytes)(body)
    if draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = str(draw(st.integers(-1, len(body) + 4)))
    return path, body, headers


def _http(
    server: ServerProcess, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@REST_FUZZ
@given(rest_requests())
def test_fuzz_rest_requests(server: ServerProcess, sent: tuple[str, bytes, dict[str, str]]) -> None:
    path, body, headers = sent
    status, raw = _http(server, "POST", path, body, headers)
    assert status in REST_WELL_DEFINED, (status, raw[:300])
    if status >= 400:
        assert "error" in json.loads(raw), raw[:300]  # the v2 error body, whatever went wrong


def test_server_survives_the_rest_fuzzing(server: ServerProcess, channel) -> None:
    _assert_live(channel)
    doc = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
        ]
    }
    status, raw = _http(server, "POST", "/v2/models/affine/infer", json.dumps(doc).encode())
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0], raw[:300]


# -- the vision API ------------------------------------------------------------------------------------------
def _png(w: int, h: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


images = st.one_of(
    st.binary(max_size=2048),
    st.builds(_png, st.integers(1, 64), st.integers(1, 64), st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16"])),
    st.builds(
        lambda png, cut: png[:cut],
        st.builds(_png, st.integers(1, 32), st.integers(1, 32), st.just("RGB")),
        st.integers(0, 200),
    ),
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"]),
)
VISION_MODELS = [
    "colour_classifier",
    "bright_segmenter",
    "box_detector",
    "grey_autoencoder",
    "grey_encoder",
    "affine",
    "nope",
    "",
]


@st.composite
def vision_calls(draw):
    rpc = draw(st.sampled_from(["Classify", "Detect", "Segment", "Encode", "Reconstruct"]))
    fields = {
        "model_name": draw(st.sampled_from(VISION_MODELS) | st.text(max_size=300)),
        "model_version": draw(st.sampled_from(["", "1", "²", "7"])),
        "images": draw(st.lists(images, max_size=4)),
    }
    if rpc == "Classify":
        fields["top_k"] = draw(st.integers(0, 2**32 - 1))
    if rpc == "Detect":
        fields["score_threshold"] = draw(st.floats(width=32, allow_nan=True))
        fields["max_detections"] = draw(st.integers(0, 2**32 - 1))
    return rpc, getattr(vpb, f"{rpc}Request")(**fields)


@FUZZ
@given(vision_calls())
def test_fuzz_vision_requests(channel, call) -> None:
    rpc, request = call
    code = _code(getattr(vpb_grpc.VisionServiceStub(channel), rpc), request)
    assert code in VISION_WELL_DEFINED


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=2048))
def test_fuzz_vision_raw_bytes(channel, data: bytes) -> None:
    call = channel.unary_unary("/cnnserve.vision.VisionService/Classify")
    assert _code(call, data) in VISION_WELL_DEFINED


def test_server_survives_the_vision_fuzzing(channel) -> None:
    _assert_live(channel)
    out = vpb_grpc.VisionServiceStub(channel).Classify(
        vpb.ClassifyRequest(model_name="colour_classifier", images=[_png(16, 16, "RGB")]), timeout=30
    )
    assert len(out.results) == 1


# -- overload and soak on an exported config -----------------------------------------------------------------
IMAGE_SHAPE = (3, 224, 224)  # 600 KB per FP32 image, as the burst that grew the server to 710 MiB


def _exported_image_model(repo: Path, gate: FileGate) -> int:
    """An image-sized model with the config export writes (queue bound, warm-up), held by `gate`."""
    from export.repository import build_config

    g = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"])],
        "pool",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 3, 1, 1])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    cfg = build_config("images", model, 8)
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size > 0, "export must bound the queue"
    cfg.ClearField("platform")
    cfg.backend = "test_faulty"
    cfg.default_model_filename = "model.onnx"
    cfg.parameters["gate_file"].string_value = str(gate.path)
    d = repo / "images"
    (d / "1").mkdir(parents=True)
    onnx.save(model, d / "1" / "model.onnx")
    (d / "config.pbtxt").write_text(render_config(cfg))
    return cfg.dynamic_batching.default_queue_policy.max_queue_size


def test_overload_is_bounded_and_loses_no_accepted_request(tmp_path: Path, server_factory) -> None:
    gate = FileGate(tmp_path / "gate")
    gate.open()
    queue_size = _exported_image_model(tmp_path / "repo", gate)
    srv = server_factory(tmp_path / "repo", "--backend-module", "fault_backends")
    rng = np.random.default_rng(0)
    x = rng.random((1, *IMAGE_SHAPE), dtype=np.float32)
    want = x.mean(axis=(2, 3)).reshape(1, 3, 1, 1)

    def request(i: int) -> tpb.ModelInferRequest:
        req = tpb.ModelInferRequest(model_name="images", id=str(i))
        req.inputs.add(name="input", datatype="FP32", shape=[1, *IMAGE_SHAPE])
        req.raw_input_contents.append(x.tobytes())
        return req

    async def burst(stub, n: int, concurrency: int, held: bool) -> tuple[int, int]:
        """n requests, `concurrency` at a time; returns (answered, refused). With `held`, the first
        wave is sent while the gate holds every execution, so the queue surely fills."""
        sem = asyncio.Semaphore(concurrency)
        answered = refused = 0

        async def one(i: int) -> None:
            nonlocal answered, refused
            async with sem:
                try:
                    out = await stub.ModelInfer(request(i))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), str(exc.details()))
                    assert "queue is full" in str(exc.details())
                    assert ("grpc-retry-pushback-ms", "100") in tuple(exc.trailing_metadata()), exc.trailing_metadata()
                    refused += 1
                    return
                assert out.id == str(i)
                np.testing.assert_allclose(
                    np.frombuffer(out.raw_output_contents[0], np.float32).reshape(want.shape), want, rtol=1e-5
                )
                answered += 1

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        if held:
            # Every request of the first wave is either held by the server (pending) or refused.
            while (
                srv.scrape().get(("nv_inference_pending_request_count", (("model", "images"), ("version", "1"))), 0)
                + refused
                < concurrency
            ):
                await asyncio.sleep(0.005)
            gate.open()
        await asyncio.gather(*tasks)
        return answered, refused

    async def main():
        async with grpc.aio.insecure_channel(srv.grpc_url, options=[("grpc.max_send_message_length", -1)]) as ch:
            stub = tpb_grpc.GRPCInferenceServiceStub(ch)
            await stub.ServerReady(tpb.ServerReadyRequest())
            await burst(stub, 64, 16, held=False)  # warm: connections, arena, gRPC buffers
            rss = [srv.rss_bytes()]
            gate.close()
            # twice the queue bound at once, so the held wave surely overflows it
            results = [await burst(stub, 400, 2 * queue_size, held=True)]
            rss.append(srv.rss_bytes())
            for _ in range(2):  # the soak: the same burst again must not grow the server further
                results.append(await burst(stub, 400, 2 * queue_size, held=False))
                rss.append(srv.rss_bytes())
            return results, rss

    before = srv.scrape()
    results, rss = asyncio.run(main())
    after = srv.scrape()
    lab = (("model", "images"), ("version", "1"))
    answered = sum(a for a, _ in results) + 64
    refused = sum(r for _, r in results)
    assert results[0][1] > 0, "the held burst never filled the queue: the test proves nothing"
    assert all(a + r == 400 for a, r in results)
    # No accepted request lost: every request the server took was answered with its own result.
    assert (
        after[("nv_inference_request_success", lab)] - before.get(("nv_inference_request_success", lab), 0) == answered
    )
    rejected = ("nv_inference_request_failure", (("model", "images"), ("reason", "REJECTED"), ("version", "1")))
    assert after[rejected] - before.get(rejected, 0) == refused
    assert after[("nv_inference_pending_request_count", lab)] == 0
    # Bounded: at most queue_size + one batch of 600 KB requests are ever held, so a burst costs tens of
    # MiB, not the 525 MiB an unbounded queue cost; and the soak rounds do not keep growing.
    mib = [r / 2**20 for r in rss]
    print(
        f"server RSS MiB: warm {mib[0]:.0f}, after the held burst {mib[1]:.0f}, soak {mib[2]:.0f} {mib[3]:.0f}; "
        f"answered {answered}, refused {refused}"
    )
    assert mib[1] - mib[0] < 200, (mib, queue_size)
    assert mib[3] - mib[1] < 64, mib
    srv.terminate()
