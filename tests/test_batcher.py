"""The dynamic batcher on real ONNX Runtime backends: batching, exact splits, limits, deadlines, draining."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import SLOW_WIDTH, affine_model, slow_model
from server.backends.base import BackendOptions
from server.backends.ort_backend import OrtBackend
from server.batcher import BatchSettings, DynamicBatcher
from server.errors import InferError

pytestmark = pytest.mark.timeout(60)


def _backends(path: Path, n: int = 1) -> list[OrtBackend]:
    return [OrtBackend(path, BackendOptions(intra_op_threads=1, inter_op_threads=1)) for _ in range(n)]


@pytest.fixture(scope="module")
def affine_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("m") / "affine.onnx"
    p.write_bytes(affine_model())
    return p


@pytest.fixture(scope="module")
def slow_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ~0.15 s or more per execution on one thread: long enough to hold the only instance busy.
    p = tmp_path_factory.mktemp("m") / "slow.onnx"
    p.write_bytes(slow_model(iterations=600))
    return p


def _affine_inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((n, 4)).astype(np.float32), "b": rng.integers(-99, 99, (n, 2)).astype(np.int64)}


def _run(coro):
    return asyncio.run(coro)


def test_mixed_batch_sizes_concatenate_and_split_exactly(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher("affine", "1", _backends(affine_file),
                           BatchSettings(max_batch_size=8, max_queue_delay_us=2_000_000))
        b.start()
        sizes = [1, 3, 2, 2]  # sums to max_batch_size: dispatched at once, without waiting the 2 s delay
        reqs = [_affine_inputs(n, i) for i, n in enumerate(sizes)]
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(b.infer(r) for r in reqs))
        elapsed = time.perf_counter() - t0
        await b.stop()
        return b, reqs, outs, elapsed

    b, reqs, outs, elapsed = _run(main())
    for r, o in zip(reqs, outs):
        assert o["y"].shape == r["a"].shape and o["z"].shape == r["b"].shape
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
        np.testing.assert_array_equal(o["z"], r["b"] + 3)
    assert b.stats.execution_count == 1
    assert b.stats.inference_count == 8
    assert set(b.stats.batch) == {8}
    assert elapsed < 1.5, "a full batch must not wait for max_queue_delay"


def test_requests_never_split_and_overflow_goes_to_next_batch(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher("affine", "1", _backends(affine_file),
                           BatchSettings(max_batch_size=8, max_queue_delay_us=100_000))
        b.start()
        reqs = [_affine_inputs(3, 10 + i) for i in range(3)]
        outs = await asyncio.gather(*(b.infer(r) for r in reqs))
        await b.stop()
        return b, reqs, outs

    b, reqs, outs = _run(main())
    for r, o in zip(reqs, outs):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
        np.testing.assert_array_equal(o["z"], r["b"] + 3)
    assert b.stats.execution_count == 2
    assert sorted(b.stats.batch) == [3, 6]


def test_preferred_batch_size_dispatches_at_once(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher("affine", "1", _backends(affine_file),
                           BatchSettings(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=300_000))
        b.start()
        reqs = [_affine_inputs(1, 20 + i) for i in range(6)]
        tasks = [asyncio.create_task(b.infer(r)) for r in reqs]
        first_four = await asyncio.wait_for(asyncio.gather(*tasks[:4]), 0.25)  # no waiting for the delay
        rest = await asyncio.gather(*tasks[4:])
        await b.stop()
        return b, reqs, first_four + rest

    b, reqs, outs = _run(main())
    for r, o in zip(reqs, outs):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
    assert b.stats.execution_count == 2
    assert sorted(b.stats.batch) == [2, 4]


def test_queue_delay_collects_requests_into_one_batch(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher("affine", "1", _backends(affine_file),
                           BatchSettings(max_batch_size=8, max_queue_delay_us=150_000))
        b.start()
        t1 = asyncio.create_task(b.infer(_affine_inputs(1, 1)))
        await asyncio.sleep(0.03)  # arrives well within the first request's delay window
        t2 = asyncio.create_task(b.infer(_affine_inputs(2, 2)))
        await asyncio.gather(t1, t2)
        await b.stop()
        return b

    b = _run(main())
    assert b.stats.execution_count == 1
    assert set(b.stats.batch) == {3}


def test_without_dynamic_batching_each_request_runs_alone(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher("affine", "1", _backends(affine_file), BatchSettings(max_batch_size=8, dynamic=False))
        b.start()
        await asyncio.gather(*(b.infer(_affine_inputs(2, i)) for i in range(4)))
        await b.stop()
        return b

    b = _run(main())
    assert b.stats.execution_count == 4
    assert set(b.stats.batch) == {2}


def test_queue_full_is_resource_exhausted_at_once(slow_file: Path) -> None:
    async def main():
        b = DynamicBatcher("slow", "1", _backends(slow_file), BatchSettings(max_batch_size=1, max_queue_size=2))
        b.start()
        x = {"x": np.ones((1, SLOW_WIDTH), np.float32)}
        running = asyncio.create_task(b.infer(x))
        await asyncio.sleep(0.02)  # the first is executing; the next two fill the queue
        queued = [asyncio.create_task(b.infer(x)) for _ in range(2)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        with pytest.raises(InferError) as err:
            await b.infer(x)
        rejected_in = time.perf_counter() - t0
        await asyncio.gather(running, *queued)
        await b.stop()
        return b, err.value, rejected_in

    b, err, rejected_in = _run(main())
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.message
    assert rejected_in < 0.05
    assert b.stats.failures["REJECTED"] == 1
    assert b.stats.inference_count == 3


def test_request_expiring_in_queue_is_never_executed(slow_file: Path) -> None:
    async def main():
        b = DynamicBatcher("slow", "1", _backends(slow_file), BatchSettings(max_batch_size=4))
        b.start()
        loop = asyncio.get_running_loop()
        running = asyncio.create_task(b.infer({"x": np.ones((1, SLOW_WIDTH), np.float32)}))
        await asyncio.sleep(0.02)
        # Different shape from nothing else queued: it would run next, but its deadline passes first.
        with pytest.raises(InferError) as err:
            await b.infer({"x": np.ones((2, SLOW_WIDTH), np.float32)}, deadline=loop.time() + 0.02)
        await running
        await b.stop()
        return b, err.value

    b, err = _run(main())
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not executed" in err.message
    assert b.stats.execution_count == 1 and b.stats.inference_count == 1  # only the first ran
    assert b.stats.never_executed == 1 and b.stats.failures["TIMEOUT"] == 1
    assert b.stats.pending == 0


def test_cancelled_while_queued_is_never_executed(slow_file: Path) -> None:
    async def main():
        b = DynamicBatcher("slow", "1", _backends(slow_file), BatchSettings(max_batch_size=4))
        b.start()
        running = asyncio.create_task(b.infer({"x": np.ones((1, SLOW_WIDTH), np.float32)}))
        await asyncio.sleep(0.02)
        doomed = asyncio.create_task(b.infer({"x": np.ones((3, SLOW_WIDTH), np.float32)}))
        await asyncio.sleep(0.01)
        doomed.cancel()  # what grpc.aio does when the client goes away or its deadline passes
        await running
        await b.stop()
        return b, doomed

    b, doomed = _run(main())
    assert doomed.cancelled()
    assert b.stats.inference_count == 1 and b.stats.never_executed == 1
    assert b.stats.failures["CANCELED"] == 1


def test_instance_count_is_concurrent_executions(slow_file: Path) -> None:
    async def queue_wait(n_instances: int) -> tuple[float, float]:
        b = DynamicBatcher("slow", "1", _backends(slow_file, n_instances), BatchSettings(max_batch_size=1))
        b.start()
        x = {"x": np.ones((1, SLOW_WIDTH), np.float32)}
        await b.infer(x)  # warm up
        q0 = b.stats.queue.ns
        t0 = time.perf_counter()
        await asyncio.gather(b.infer(x), b.infer(x))
        wall = time.perf_counter() - t0
        waited = (b.stats.queue.ns - q0) / 1e9
        await b.stop()
        return waited, wall

    # Queue time, not speed: on a loaded machine two instances need not be faster, but with two the
    # second request starts at once, while with one it waits for the whole first execution.
    waited_one, wall_one = _run(queue_wait(1))
    waited_two, _ = _run(queue_wait(2))
    assert waited_one > 0.3 * wall_one, (waited_one, wall_one)
    assert waited_two < 0.02, waited_two


def test_stop_answers_every_accepted_request_then_refuses(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher("affine", "1", _backends(affine_file),
                           BatchSettings(max_batch_size=4, max_queue_delay_us=500_000))
        b.start()
        reqs = [_affine_inputs(1, i) for i in range(10)]
        tasks = [asyncio.create_task(b.infer(r)) for r in reqs]
        await asyncio.sleep(0)
        await b.stop()
        outs = await asyncio.gather(*tasks)
        with pytest.raises(InferError) as err:
            await b.infer(reqs[0])
        return b, reqs, outs, err.value

    b, reqs, outs, err = _run(main())
    for r, o in zip(reqs, outs):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
    assert b.stats.inference_count == 10
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_backend_failure_fails_the_batch_not_the_batcher(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher("affine", "1", _backends(affine_file), BatchSettings(max_batch_size=8))
        b.start()
        bad = {"a": np.ones((1, 5), np.float32), "b": np.ones((1, 2), np.int64)}  # bypasses validation
        with pytest.raises(InferError) as err:
            await b.infer(bad)
        good = _affine_inputs(2, 5)
        out = await b.infer(good)
        await b.stop()
        return b, err.value, good, out

    b, err, good, out = _run(main())
    assert err.code == grpc.StatusCode.INTERNAL and "execution failed" in err.message
    np.testing.assert_array_equal(out["y"], good["a"] * 2 + 1)
    assert b.stats.failures["BACKEND"] == 1
