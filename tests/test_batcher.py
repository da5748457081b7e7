"""The dynamic batcher on real ONNX Runtime backends: batching, exact splits, limits, deadlines, draining.

Orders of events come from observable state, never from how long something takes: a backend held by a
`Gate` (tests/fault_backends.py) stays busy until the test opens it, and queue delays that must not
expire are an hour long (a test that waited for one would hit the pytest timeout, not pass slowly).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import affine_model
from fault_backends import Gate, GatedBackend
from server.backends.base import BackendOptions
from server.backends.ort_backend import OrtBackend
from server.errors import InferError
from server.scheduling.batcher import BatchSettings, DynamicBatcher

pytestmark = pytest.mark.timeout(60)

HOUR_US = 3600 * 1_000_000  # a queue delay no test may wait out


def _backends(path: Path, n: int = 1) -> list[OrtBackend]:
    return [OrtBackend(path, BackendOptions(intra_op_threads=1, inter_op_threads=1)) for _ in range(n)]


@pytest.fixture(scope="module")
def affine_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("m") / "affine.onnx"
    p.write_bytes(affine_model())
    return p


def _gated(path: Path, gate: Gate, n: int = 1) -> list[GatedBackend]:
    return [GatedBackend(b, gate) for b in _backends(path, n)]


def _affine_inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((n, 4)).astype(np.float32), "b": rng.integers(-99, 99, (n, 2)).astype(np.int64)}


def _run(coro):
    return asyncio.run(coro)


def test_mixed_batch_sizes_concatenate_and_split_exactly(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher(
            "affine", "1", _backends(affine_file), BatchSettings(max_batch_size=8, max_queue_delay_us=HOUR_US)
        )
        b.start()
        sizes = [1, 3, 2, 2]  # sums to max_batch_size: dispatched at once, without waiting out the delay
        reqs = [_affine_inputs(n, i) for i, n in enumerate(sizes)]
        outs = await asyncio.gather(*(b.infer(r) for r in reqs))
        await b.stop()
        return b, reqs, outs

    b, reqs, outs = _run(main())
    for r, o in zip(reqs, outs, strict=True):
        assert o["y"].shape == r["a"].shape and o["z"].shape == r["b"].shape
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
        np.testing.assert_array_equal(o["z"], r["b"] + 3)
    assert b.stats.execution_count == 1
    assert b.stats.inference_count == 8
    assert set(b.stats.batch) == {8}


def test_requests_never_split_and_overflow_goes_to_next_batch(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher(
            "affine", "1", _backends(affine_file), BatchSettings(max_batch_size=8, max_queue_delay_us=100_000)
        )
        b.start()
        reqs = [_affine_inputs(3, 10 + i) for i in range(3)]
        outs = await asyncio.gather(*(b.infer(r) for r in reqs))
        await b.stop()
        return b, reqs, outs

    b, reqs, outs = _run(main())
    for r, o in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
        np.testing.assert_array_equal(o["z"], r["b"] + 3)
    assert b.stats.execution_count == 2
    assert sorted(b.stats.batch) == [3, 6]


def test_preferred_batch_size_dispatches_at_once(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher(
            "affine",
            "1",
            _backends(affine_file),
            BatchSettings(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=HOUR_US),
        )
        b.start()
        reqs = [_affine_inputs(1, 20 + i) for i in range(6)]
        tasks = [asyncio.create_task(b.infer(r)) for r in reqs]
        first_four = await asyncio.gather(*tasks[:4])  # reached the preferred size: no waiting for the delay
        rest_waiting = b.queued  # the other two wait for more company (an hour), until stop flushes them
        await b.stop()
        rest = await asyncio.gather(*tasks[4:])
        return b, reqs, first_four + rest, rest_waiting

    b, reqs, outs, rest_waiting = _run(main())
    for r, o in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
    assert rest_waiting == 2
    assert b.stats.execution_count == 2
    assert sorted(b.stats.batch) == [2, 4]


def test_queue_delay_collects_requests_into_one_batch(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher(
            "affine", "1", _backends(affine_file), BatchSettings(max_batch_size=8, max_queue_delay_us=HOUR_US)
        )
        b.start()
        t1 = asyncio.create_task(b.infer(_affine_inputs(1, 1)))
        for _ in range(5):  # the scheduler takes the instance and starts gathering around the first
            await asyncio.sleep(0)
        t2 = asyncio.create_task(b.infer(_affine_inputs(2, 2)))
        await asyncio.sleep(0)
        executed_before_stop = b.stats.execution_count
        await b.stop()  # the delay never ends on its own here: stopping dispatches what was gathered
        await asyncio.gather(t1, t2)
        return b, executed_before_stop

    b, executed_before_stop = _run(main())
    assert executed_before_stop == 0
    assert b.stats.execution_count == 1
    assert set(b.stats.batch) == {3}


def test_lone_request_runs_when_its_queue_delay_ends(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher(
            "affine", "1", _backends(affine_file), BatchSettings(max_batch_size=8, max_queue_delay_us=20_000)
        )
        b.start()
        x = _affine_inputs(1, 3)
        out = await b.infer(x)  # nobody else comes: the delay's end, not a full batch, dispatches it
        await b.stop()
        return b, x, out

    b, x, out = _run(main())
    np.testing.assert_array_equal(out["y"], x["a"] * 2 + 1)
    assert b.stats.execution_count == 1 and set(b.stats.batch) == {1}


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


def test_queue_full_is_resource_exhausted_at_once(affine_file: Path) -> None:
    async def main():
        gate = Gate()
        b = DynamicBatcher("affine", "1", _gated(affine_file, gate), BatchSettings(max_batch_size=1, max_queue_size=2))
        b.start()
        x = _affine_inputs(1, 0)
        running = asyncio.create_task(b.infer(x))
        await asyncio.to_thread(gate.wait_entered, 1)  # executing, held: the next two fill the queue
        queued = [asyncio.create_task(b.infer(x)) for _ in range(2)]
        await asyncio.sleep(0)
        assert b.queued == 2
        # Refused while the gate is still closed: the refusal cannot have waited for room in the queue.
        with pytest.raises(InferError) as err:
            await b.infer(x)
        gate.open()
        await asyncio.gather(running, *queued)
        await b.stop()
        return b, err.value

    b, err = _run(main())
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.message
    assert b.stats.failures["REJECTED"] == 1
    assert b.stats.inference_count == 3


def test_request_expiring_in_queue_is_never_executed(affine_file: Path) -> None:
    async def main():
        gate = Gate()
        b = DynamicBatcher("affine", "1", _gated(affine_file, gate), BatchSettings(max_batch_size=4))
        b.start()
        loop = asyncio.get_running_loop()
        running = asyncio.create_task(b.infer(_affine_inputs(1, 0)))
        await asyncio.to_thread(gate.wait_entered, 1)  # the only instance is held until the gate opens
        # Next in line, but the instance stays busy until after its deadline.
        with pytest.raises(InferError) as err:
            await b.infer(_affine_inputs(2, 1), deadline=loop.time() + 0.02)
        gate.open()
        await running
        await b.stop()
        return b, err.value

    b, err = _run(main())
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not executed" in err.message
    assert b.stats.execution_count == 1 and b.stats.inference_count == 1  # only the first ran
    assert b.stats.never_executed == 1 and b.stats.failures["TIMEOUT"] == 1
    assert b.stats.pending == 0


def test_cancelled_while_queued_is_never_executed(affine_file: Path) -> None:
    async def main():
        gate = Gate()
        b = DynamicBatcher("affine", "1", _gated(affine_file, gate), BatchSettings(max_batch_size=4))
        b.start()
        running = asyncio.create_task(b.infer(_affine_inputs(1, 0)))
        await asyncio.to_thread(gate.wait_entered, 1)
        doomed = asyncio.create_task(b.infer(_affine_inputs(3, 1)))
        await asyncio.sleep(0)
        assert b.queued == 1
        doomed.cancel()  # what grpc.aio does when the client goes away or its deadline passes
        await asyncio.gather(doomed, return_exceptions=True)
        gate.open()
        await running
        await b.stop()
        return b, doomed

    b, doomed = _run(main())
    assert doomed.cancelled()
    assert b.stats.inference_count == 1 and b.stats.never_executed == 1
    assert b.stats.failures["CANCELED"] == 1
    assert b.stats.pending == 0


@pytest.mark.parametrize("n_instances", [1, 2])
def test_instance_count_is_concurrent_executions(affine_file: Path, n_instances: int) -> None:
    async def main():
        gate = Gate()
        b = DynamicBatcher("affine", "1", _gated(affine_file, gate, n_instances), BatchSettings(max_batch_size=1))
        b.start()
        tasks = [asyncio.create_task(b.infer(_affine_inputs(1, i))) for i in range(2)]
        # Inside the backend at the same time, with the gate closed: as many as there are instances.
        await asyncio.to_thread(gate.wait_entered, n_instances)
        await asyncio.sleep(0)
        held = (gate.entered, b.queued)
        gate.open()
        await asyncio.gather(*tasks)
        await b.stop()
        return held

    entered, queued = _run(main())
    assert entered == n_instances
    assert queued == 2 - n_instances  # with one instance the second request waits its turn in the queue


def test_stop_answers_every_accepted_request_then_refuses(affine_file: Path) -> None:
    async def main():
        b = DynamicBatcher(
            "affine", "1", _backends(affine_file), BatchSettings(max_batch_size=4, max_queue_delay_us=500_000)
        )
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
    for r, o in zip(reqs, outs, strict=True):
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


class _RaisesTimeoutError(OrtBackend):
    """A backend whose execution fails with its own TimeoutError (a socket or lock timeout inside it)."""

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if inputs["a"][0, 0] == 13:
            raise TimeoutError("backend's own timeout")
        return super().execute(inputs)


@pytest.mark.parametrize("execution_timeout_ms", [0, 3_600_000])
def test_backend_raising_timeout_error_is_a_failed_batch_not_a_hang(
    affine_file: Path, execution_timeout_ms: int
) -> None:
    # Was taken for an overrun of execution_timeout_ms: the model faulted (UNAVAILABLE from then on).
    async def main():
        backend = _RaisesTimeoutError(affine_file, BackendOptions(intra_op_threads=1, inter_op_threads=1))
        b = DynamicBatcher(
            "affine", "1", [backend], BatchSettings(max_batch_size=8, execution_timeout_ms=execution_timeout_ms)
        )
        b.start()
        bad = _affine_inputs(1, 6)
        bad["a"][0, 0] = 13
        with pytest.raises(InferError) as err:
            await b.infer(bad)
        good = _affine_inputs(2, 7)
        out = await b.infer(good)
        await b.stop()
        return b, err.value, good, out

    b, err, good, out = _run(main())
    assert err.code == grpc.StatusCode.INTERNAL and "backend's own timeout" in err.message
    assert b.fault is None
    np.testing.assert_array_equal(out["y"], good["a"] * 2 + 1)
    assert b.stats.failures["BACKEND"] == 1


# -- overlap and buffer reuse ---------------------------------------------------------------------------
class _TwoAtOnce(GatedBackend):
    """A gated backend that takes two executions at once (as OpenVINO with its spare infer request)."""

    concurrent_executions = 2

    def __init__(self, inner, gate: Gate) -> None:
        super().__init__(inner, gate)
        self.concurrent_executions = 2
        self.sizes: list[int] = []

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sizes.append(len(inputs["a"]))
        return super().execute(inputs)


@pytest.mark.parametrize("concurrent", [1, 2])
def test_next_batch_forms_while_one_computes(affine_file: Path, concurrent: int) -> None:
    async def main():
        gate = Gate()
        inner = _backends(affine_file)[0]
        backend = _TwoAtOnce(inner, gate) if concurrent == 2 else GatedBackend(inner, gate)
        b = DynamicBatcher(
            "affine",
            "1",
            [backend],
            BatchSettings(max_batch_size=4, preferred_batch_sizes=(2,), max_queue_delay_us=HOUR_US),
        )
        b.start()
        reqs = [_affine_inputs(2, 0), _affine_inputs(1, 1), _affine_inputs(1, 2)]
        first = asyncio.create_task(b.infer(reqs[0]))
        await asyncio.to_thread(gate.wait_entered, 1)  # batch 1 is computing, held inside the backend
        rest = [asyncio.create_task(b.infer(r)) for r in reqs[1:]]
        if concurrent == 2:  # the second slot gathers requests 2 and 3 into a batch of the preferred 2
            await asyncio.to_thread(gate.wait_entered, 2)
        else:
            while b.queued < 2:  # both accepted and waiting for the one busy slot
                await asyncio.sleep(0)
        held = (gate.entered, b.queued, b.stats.pending, first.done())
        gate.open()
        outs = [await first, *await asyncio.gather(*rest)]
        await b.stop()
        return held, reqs, outs, b

    (entered, queued, pending, first_done), reqs, outs, b = _run(main())
    assert not first_done and pending == 3
    assert (entered, queued) == ((2, 0) if concurrent == 2 else (1, 2))
    for r, o in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
        np.testing.assert_array_equal(o["z"], r["b"] + 3)
    assert b.stats.execution_count == 2


def test_a_saturated_runtime_gets_no_smaller_batch_than_it_runs(affine_file: Path) -> None:
    # One computing, one spare: the spare slot holds a lone request past its (zero) queue delay while a
    # batch of 2 computes, and dispatches once its own batch has 2 too.
    async def main():
        gate = Gate()
        backend = _TwoAtOnce(_backends(affine_file)[0], gate)
        b = DynamicBatcher("affine", "1", [backend], BatchSettings(max_batch_size=4, max_queue_delay_us=0))
        b.start()
        reqs = [_affine_inputs(2, 0), _affine_inputs(1, 1), _affine_inputs(1, 2)]
        first = asyncio.create_task(b.infer(reqs[0]))
        await asyncio.to_thread(gate.wait_entered, 1)
        second = asyncio.create_task(b.infer(reqs[1]))
        for _ in range(100):  # event-loop passes: ample for the scheduler to dispatch it, were it to
            await asyncio.sleep(0)
        held = (gate.entered, b.queued)
        third = asyncio.create_task(b.infer(reqs[2]))
        await asyncio.to_thread(gate.wait_entered, 2)
        gate.open()
        outs = await asyncio.gather(first, second, third)
        await b.stop()
        return held, backend.sizes, reqs, outs

    held, sizes, reqs, outs = _run(main())
    assert held == (1, 1)
    assert sizes == [2, 2]
    for r, o in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)


class _Recording(GatedBackend):
    """Records the address of every batch's inputs; optionally answers with its input (an identity graph)."""

    def __init__(self, inner, identity: bool = False) -> None:
        gate = Gate()
        gate.open()
        super().__init__(inner, gate)
        self.identity = identity
        self.addresses: list[tuple[int, int]] = []

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.addresses.append((inputs["a"].shape[0], inputs["a"].ctypes.data))
        out = self.inner.execute(inputs)
        return {"y": inputs["a"], "z": out["z"]} if self.identity else out


@pytest.mark.parametrize("identity", [False, True])
def test_one_batch_buffer_is_reused_across_batches(affine_file: Path, identity: bool) -> None:
    async def main():
        backend = _Recording(_backends(affine_file)[0], identity)
        b = DynamicBatcher(
            "affine",
            "1",
            [backend],
            BatchSettings(max_batch_size=3, preferred_batch_sizes=(2,), max_queue_delay_us=HOUR_US),
        )
        b.start()
        results = []
        for sizes, seed in (((1, 2), 10), ((1, 1), 20), ((1, 2), 30)):  # batches of 3, 2, then 3 again
            reqs = [_affine_inputs(n, seed + i) for i, n in enumerate(sizes)]
            results.append((reqs, await asyncio.gather(*(b.infer(r) for r in reqs))))
        await b.stop()
        return backend.addresses, results

    addresses, results = _run(main())
    assert [n for n, _ in addresses] == [3, 2, 3]
    assert len({a for _, a in addresses}) == 1  # one buffer: the batch of 2 fills the first rows of the 3
    # every request got its own rows, including the first batches', whose buffer the later ones refilled
    for reqs, outs in results:
        for r, o in zip(reqs, outs, strict=True):
            np.testing.assert_array_equal(o["y"], r["a"] if identity else r["a"] * 2 + 1)
            np.testing.assert_array_equal(o["z"], r["b"] + 3)


class _Arrivals:
    """Counts slots reaching a run lock, across instances; `two` is set at the second."""

    def __init__(self) -> None:
        self.count = 0
        self.two = threading.Event()
        self.lock = threading.Lock()  # the slots' threads count concurrently

    def arrive(self) -> None:
        with self.lock:
            self.count += 1
            if self.count == 2:
                self.two.set()


class _GatedRun(OrtBackend):
    """ONNX Runtime whose runs pass a gate; counts the slots that reached the instance's run lock (its
    `runtime_turn`), here and in `arrivals` (shared between instances), and the runs inside it."""

    def __init__(self, path: Path, gate: Gate, arrivals: _Arrivals | None = None) -> None:
        super().__init__(path, BackendOptions(intra_op_threads=1, inter_op_threads=1))
        self.gate = gate
        self.arrivals = arrivals or _Arrivals()
        self.arrived = 0
        self._count = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.sizes: list[int] = []

    @contextmanager
    def runtime_turn(self) -> Iterator[None]:
        with self._count:
            self.arrived += 1
        self.arrivals.arrive()
        with super().runtime_turn():
            yield

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._count:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.sizes.append(len(inputs["a"]))
        try:
            self.gate.pass_through()
            return super().execute(inputs)
        finally:
            with self._count:
                self.running -= 1


def test_onnxruntime_gathers_the_next_batch_while_one_runs_and_runs_one_at_a_time(affine_file: Path) -> None:
    # The second execution slot takes requests 2 and 3 as a batch of the preferred 2 while batch 1 is held
    # inside its run; it waits on the instance's run lock, not in the queue, and runs once batch 1 returns.
    async def main():
        gate = Gate()
        backend = _GatedRun(affine_file, gate)
        b = DynamicBatcher(
            "affine",
            "1",
            [backend],
            BatchSettings(max_batch_size=4, preferred_batch_sizes=(2,), max_queue_delay_us=HOUR_US),
        )
        b.start()
        reqs = [_affine_inputs(2, 0), _affine_inputs(1, 1), _affine_inputs(1, 2)]
        first = asyncio.create_task(b.infer(reqs[0]))
        await asyncio.to_thread(gate.wait_entered, 1)  # batch 1 is running, held inside its run
        rest = [asyncio.create_task(b.infer(r)) for r in reqs[1:]]
        await asyncio.to_thread(backend.arrivals.two.wait)  # the spare slot gathered requests 2 and 3
        held = (backend.running, b.queued, gate.entered, first.done())
        gate.open()
        outs = [await first, *await asyncio.gather(*rest)]
        await b.stop()
        return held, reqs, outs, backend, b

    held, reqs, outs, backend, b = _run(main())
    assert backend.concurrent_executions == 2
    assert held == (1, 0, 1, False)  # batch 2 gathered and waiting for the runtime, nothing left queued
    assert backend.most_running == 1 and backend.sizes == [2, 2]
    for r, o in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
        np.testing.assert_array_equal(o["z"], r["b"] + 3)
    assert b.stats.execution_count == 2


def test_a_second_batch_goes_to_an_idle_instance_before_a_busy_ones_spare_slot(affine_file: Path) -> None:
    # Two ONNX Runtime instances, two slots each: the second request runs beside the first on the other
    # instance, not behind it on the first one's spare slot.
    async def main():
        gate, arrivals = Gate(), _Arrivals()
        backends = [_GatedRun(affine_file, gate, arrivals) for _ in range(2)]
        b = DynamicBatcher("affine", "1", backends, BatchSettings(max_batch_size=1))
        b.start()
        reqs = [_affine_inputs(1, 40), _affine_inputs(1, 41)]
        tasks = [asyncio.create_task(b.infer(r)) for r in reqs]
        await asyncio.to_thread(arrivals.two.wait)  # both dispatched and at an instance's run lock
        placed = [x.arrived for x in backends]
        gate.open()
        outs = await asyncio.gather(*tasks)
        await b.stop()
        return placed, reqs, outs

    placed, reqs, outs = _run(main())
    assert placed == [1, 1]
    for r, o in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(o["y"], r["a"] * 2 + 1)
