"""The data plane's one request path in-process, on a real repository and ONNX Runtime: what it checks, in which
order, what it counts, and how the error boundary answers what it raises."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import affine_model, write_model
from server.bindings.grpc_boundary import guard_handler
from server.dataplane.normalize import OutputIn, deadline_from, timeout_parameter
from server.dataplane.plane import DataPlane
from server.dataplane.state import ServerState
from server.dataplane.tensors import TensorIn
from server.errors import HTTP_STATUS, InferError, echo, status_of
from server.repository import ModelRepository

pytestmark = pytest.mark.timeout(120)


def _affine_inputs(n: int = 2) -> list[TensorIn]:
    a = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
    b = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
    return [TensorIn("a", "FP32", a.shape, raw=a.tobytes()), TensorIn("b", "INT64", b.shape, raw=b.tobytes())]


async def _with_path(repo_dir: Path, body):
    repo = ModelRepository(repo_dir)
    await repo.load_all()
    state = ServerState()
    state.started = True
    plane = DataPlane(repo, state, vision_threads=1)
    try:
        return await body(plane, repo, state)
    finally:
        plane.close()
        await repo.close()


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    write_model(tmp_path, "affine", affine_model(), "max_batch_size: 8\ndynamic_batching { }\n")
    return tmp_path


def test_normalized_request_infers(repo_dir: Path) -> None:
    async def body(path: DataPlane, repo, state):
        req = await path.normalize(
            "affine", "", _affine_inputs(), outputs=[OutputIn("y")], request_id="r1", parameters={"timeout": 5_000_000}
        )
        assert req.outputs == ["y"] and req.id == "r1" and req.deadline is not None
        return {o.name: o.array for o in (await path.infer(req)).outputs}

    out = asyncio.run(_with_path(repo_dir, body))
    np.testing.assert_array_equal(out["y"], np.arange(8, dtype=np.float32).reshape(2, 4) * 2 + 1)


def test_declaration_is_checked_before_contents_are_decoded(repo_dir: Path) -> None:
    """A BYTES tensor for an FP32 input is refused on its datatype: its (unparseable) contents are never
    read, which is what kept a 60 MB BYTES tensor from stalling the event loop."""
    garbage = memoryview(b"\xff\xff\xff\xff" * 1000)  # would be a truncated-element error if decoded

    async def body(path: DataPlane, repo, state):
        bad = [TensorIn("a", "BYTES", (2, 4), raw=garbage), _affine_inputs()[1]]
        with pytest.raises(InferError) as err:
            await path.normalize("affine", "", bad)
        return err.value

    err = asyncio.run(_with_path(repo_dir, body))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'a': expected datatype FP32, got BYTES" in err.message


@pytest.mark.parametrize(
    "inputs, fragment",
    [
        (lambda t: [t[0], t[1], t[0]], "input 'a' given twice"),
        (lambda t: [t[0]], "missing input(s) 'b'"),
        (lambda t: [TensorIn("a", "FP32", (2, 4), raw=b"\0" * 3), t[1]], "expected 32 bytes for FP32 [2, 4], got 3"),
        (lambda t: [TensorIn("a", "FP32", (9, 4), raw=b"\0" * 144), t[1]], "exceeds max_batch_size 8"),
        (lambda t: [TensorIn("a", "FP32", (2, 4), values=[1.0]), t[1]], "expected 8 elements in data"),
    ],
)
def test_every_refusal_is_counted_once_as_invalid(repo_dir: Path, inputs, fragment: str) -> None:
    async def body(path: DataPlane, repo, state):
        stats = repo.get("affine").stats
        before = stats.fail.count
        with pytest.raises(InferError) as err:
            await path.normalize("affine", "", inputs(_affine_inputs()))
        return err.value, stats.fail.count - before

    err, counted = asyncio.run(_with_path(repo_dir, body))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.message, err.message
    assert counted == 1


def test_draining_and_unknown_models(repo_dir: Path) -> None:
    async def body(path: DataPlane, repo, state):
        with pytest.raises(InferError) as unknown:
            await path.normalize("nope", "", _affine_inputs())
        state.shutting_down = True
        with pytest.raises(InferError) as draining:
            await path.normalize("affine", "", _affine_inputs())
        return unknown.value, draining.value

    unknown, draining = asyncio.run(_with_path(repo_dir, body))
    assert unknown.code == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in unknown.message
    assert draining.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in draining.message


def test_timeout_parameter_and_deadlines() -> None:
    assert timeout_parameter({}) is None and timeout_parameter({"timeout": 1500}) == 1500
    for bad in ("soon", 1.5, True):
        with pytest.raises(InferError, match="parameter 'timeout' must be an integer"):
            timeout_parameter({"timeout": bad})

    async def main():
        now = asyncio.get_running_loop().time()
        return (
            now,
            deadline_from(None, None),
            deadline_from(10.0, 1_000_000),
            deadline_from(0.5, 10_000_000),
            deadline_from(1e10, None),
        )

    now, none, by_timeout, by_transport, huge = asyncio.run(main())
    assert none is None and huge is None
    assert now + 0.9 < by_timeout < now + 2.0  # the 1 s timeout beats the 10 s transport deadline
    assert now + 0.4 < by_transport < now + 1.0  # the 0.5 s transport deadline beats the 10 s timeout


def test_error_boundary_maps_every_failure() -> None:
    class Context:
        def __init__(self) -> None:
            self.trailers = ()

        def set_trailing_metadata(self, trailers) -> None:
            self.trailers = trailers

        async def abort(self, code, message):
            raise _Aborted(code, message)

    class _Aborted(Exception):
        def __init__(self, code, message) -> None:
            super().__init__(message)
            self.code, self.message = code, message

    async def refuse(request, context):
        raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", trailers=(("grpc-retry-pushback-ms", "50"),))

    async def crash(request, context):
        raise KeyError("boom")

    async def ok(request, context):
        return "fine"

    def handler(fn):
        return guard_handler(grpc.unary_unary_rpc_method_handler(fn), "Test/Call")

    async def main():
        results = []
        for fn in (refuse, crash):
            ctx = Context()
            with pytest.raises(_Aborted) as aborted:
                await handler(fn).unary_unary(None, ctx)
            results.append((aborted.value.code, aborted.value.message, ctx.trailers))
        results.append(await handler(ok).unary_unary(None, Context()))
        return results

    refused, crashed, fine = asyncio.run(main())
    assert refused == (grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("grpc-retry-pushback-ms", "50"),))
    assert crashed[0] == grpc.StatusCode.INTERNAL and "Test/Call: internal error: KeyError" in crashed[1]
    assert fine == "fine"
    assert status_of(ValueError("x"), "R").http_status == 500
    assert (
        HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
        and InferError(grpc.StatusCode.INVALID_ARGUMENT, "").http_status == 400
    )


def test_echo_truncates_what_it_quotes() -> None:
    assert echo("short") == "'short'"
    long = echo("x" * 10_000)
    assert len(long) < 200 and "(10000 characters)" in long
    assert "\\n" in echo("a\nb")  # control characters are escaped, never raw in a status message


def test_the_model_default_timeout_is_part_of_the_one_deadline() -> None:
    """config default_timeout_us is applied where the deadline is computed (the batcher only enforces)."""

    async def main():
        now = asyncio.get_running_loop().time()
        return (
            now,
            deadline_from(None, None, 500_000),
            deadline_from(None, 2_000_000, 500_000),
            deadline_from(0.2, None, 5_000_000),
            deadline_from(None, None, 0),
        )

    now, by_default, default_first, transport_first, none = asyncio.run(main())
    assert now + 0.4 < by_default < now + 1.0 and now + 0.4 < default_first < now + 1.0
    assert now + 0.1 < transport_first < now + 0.5
    assert none is None


@pytest.mark.parametrize(
    "tensor, fragment",
    [
        (
            TensorIn(
                "a",
                "FP32",
                (2, 4),
                raw=b"\0" * 32,
                values=[0.0] * 8,
                raw_field="raw_input_contents",
                values_field="contents.fp32_contents",
            ),
            "input 'a': both raw_input_contents and contents.fp32_contents given",
        ),
        (
            TensorIn("a", "FP32", (2, 4), raw_field="parameters.binary_data_size"),
            "input 'a': neither 'data' nor parameters.binary_data_size given",
        ),
        (
            TensorIn(
                "a",
                "FP32",
                (2, 4),
                values=[0.0] * 8,
                parameters={"shared_memory_region": "nowhere", "shared_memory_byte_size": 32},
            ),
            "shared memory region 'nowhere' is not registered",
        ),
        (TensorIn("a", "FP32", (2, -4), raw=b""), "has a negative dimension"),
    ],
)
def test_each_input_gives_its_contents_one_way(repo_dir: Path, tensor: TensorIn, fragment: str) -> None:
    """The exclusivity of shared memory, raw and typed contents is checked once, for every binding."""

    async def body(path: DataPlane, repo, state):
        with pytest.raises(InferError) as err:
            await path.normalize("affine", "", [tensor, _affine_inputs()[1]])
        return err.value

    err = asyncio.run(_with_path(repo_dir, body))
    assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert fragment in err.message, err.message


def test_the_vision_pool_is_sized_by_the_flag_and_closed_with_the_plane(repo_dir: Path) -> None:
    async def body(path: DataPlane, repo, state):
        sized = DataPlane(repo, state, vision_threads=3)
        pool = sized.vision._pool
        workers = pool._max_workers
        sized.close()
        with pytest.raises(RuntimeError, match="shutdown"):
            pool.submit(print)
        return workers

    assert asyncio.run(_with_path(repo_dir, body)) == 3
