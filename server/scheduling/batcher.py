"""The dynamic batcher (the scheduling layer): one per loaded model version, shared by every binding.

API (what the data plane calls with a normalized request, for ModelInfer, REST and the vision API alike):

    outputs = await batcher.infer(inputs, deadline=None, received_ns=None)

    inputs:      {input name: np.ndarray}, already normalized by the data plane (server/dataplane/
                 normalize.py); for a batching model (max_batch_size > 0) every array has the request's
                 batch size as its first dimension, and all share it.
    deadline:    absolute time on the event loop clock (asyncio.get_running_loop().time()) after which
                 the request must not start executing; None = no limit. The data plane computed it
                 (the config's default_timeout_us included); the batcher only enforces it: a request
                 still queued at its deadline fails with DEADLINE_EXCEEDED and is never executed; one whose
                 awaiting task is cancelled (client gone, gRPC deadline) is dropped from the queue and never
                 executed.
    received_ns: time.perf_counter_ns() when the request arrived, so latency metrics include decoding.
    returns:     {output name: np.ndarray} with this request's batch size first; views into the batch's
                 output arrays (read-only use; copy if you mutate).
    raises:      server.errors.InferError: RESOURCE_EXHAUSTED (queue full, at once), DEADLINE_EXCEEDED,
                 UNAVAILABLE (batcher stopping, or the model faulted), INTERNAL (backend failure).

Scheduling follows Triton's dynamic batcher. An idle instance takes the oldest queued request and, with
it, as many following requests (same per-item shapes) as fit in max_batch_size, never splitting one.
It dispatches at once when the batch is full or reaches the largest preferred_batch_size; otherwise it
waits up to max_queue_delay_microseconds after the oldest request's arrival for more. With preferred
sizes, the batch taken is the largest prefix whose size is preferred, if one exists. While every
instance is busy requests accumulate, which is where batches come from under load. Backends execute in
a thread pool with one thread per instance (ONNX Runtime releases the GIL), so the event loop keeps
decoding and answering while a batch runs.

Overlap: an instance whose backend takes several executions at once (`Backend.concurrent_executions`,
e.g. OpenVINO's infer requests, one more than the CPU plugin's streams) gets that many execution slots,
each with its own thread. While one batch computes, another slot gathers the next batch and copies it
in, so the runtime's next inference starts with its inputs ready. While the instance's runtime is
saturated (as many executions running as it computes at once: all its slots but one) the gathering
slot does not dispatch on the queue delay alone: it keeps gathering until its batch is as large as the
ones computing, or one of them finishes. Dispatching a small batch into a busy runtime would only make
it wait there while later requests could not join it (measured: mean batch 2.6 instead of 4 at
concurrency 8 on mobilenet_v2, throughput down by a fifth).
ONNX Runtime takes two executions per instance but runs one at a time: the slot's thread holds the
backend's `runtime_turn` (its run lock) around `execute`, so the gathered batch waits there, counted as
input time rather than compute, and starts the moment the running one returns, without a round trip
through the event loop.

Zero copies: each slot gathers a multi-request batch into one contiguous buffer that it reuses for every
later batch (sized to the largest batch it has gathered; a smaller batch fills its first rows), copying
the requests straight into it (no np.concatenate temporaries); a lone request goes to the backend as it
came (a view over the message bytes). Outputs are split back as views; an output that still shares
memory with the reused buffer is copied first, since the next batch overwrites the buffer.

Fault isolation: a backend that raises fails only the batch it was executing (INTERNAL naming the
model). With `execution_timeout_ms` set, an execution that has not returned by then is abandoned: its
requests fail INTERNAL, the batcher becomes faulted (`fault` says why, `on_fault` tells the repository,
which marks the model not ready), queued and later requests get UNAVAILABLE, and nothing else in the
process waits on it. Each instance executes on its own daemon thread rather than a pool's: a call stuck
in native code cannot be interrupted, and a pool's exit hook would join that thread forever.

Waits shorter than a millisecond poll the event loop instead of arming a timer: epoll rounds timeouts
up to whole milliseconds, so the default 100 us delay would otherwise hold every lone request ~1 ms.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from server import metrics
from server.backends.base import Backend
from server.errors import InferError
from server.stats import ModelStats

# Below this, a gather wait yields to the event loop (which reads newly arrived requests) rather than
# sleeping on a timer that the selector would round up to 1 ms.
_TIMER_RESOLUTION_S = 1e-3

log = logging.getLogger("cnnserve.batcher")


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 0  # 0: the model has no batch dimension; each request executes alone
    dynamic: bool = True  # config has dynamic_batching; False: one request per execution (Triton default)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # queued requests; 0 = unbounded
    default_timeout_us: int = 0  # from default_queue_policy; 0 = none (the data plane applies it)
    execution_timeout_ms: int = 0  # config parameter execution_timeout_ms; 0 = executions may take any time


_QUEUED, _RUNNING, _DROPPED = 0, 1, 2


class _ExecutionHung(Exception):
    """An execution overran execution_timeout_ms (told apart from a TimeoutError the backend raises)."""


class _InstanceThread:
    """One backend instance's worker: runs submitted calls in order on a daemon thread."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._calls.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            fut, fn, args = call
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    def stop(self) -> None:
        """Let the thread end after its current call; never waits (that call may never return)."""
        self._calls.put(None)


class _BatchBuffers:
    """One execution slot's input buffers, reused across its batches: per per-item shape, one contiguous
    array per input as large as the largest batch the slot has gathered; a batch of n fills its first n
    rows (a C-contiguous prefix, itself contiguous). The slot executes one batch at a time and the
    backend is done with its inputs when `execute` returns, so the buffer is free again by the slot's
    next batch. Memory: one largest batch per slot, not one per batch size; bounded in item shapes, which
    variable dimensions could otherwise grow without limit."""

    KEEP = 4

    def __init__(self) -> None:
        self._by_shape: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()

    def gather(self, batch: list[_Request]) -> dict[str, np.ndarray]:
        first = batch[0].inputs
        total = sum(r.items for r in batch)
        key = (batch[0].key, tuple(a.dtype.str for a in first.values()))
        bufs = self._by_shape.get(key)
        if bufs is None or next(iter(bufs.values())).shape[0] < total:
            bufs = {name: np.empty((total, *a.shape[1:]), a.dtype) for name, a in first.items()}
            self._by_shape[key] = bufs
            if len(self._by_shape) > self.KEEP:
                self._by_shape.popitem(last=False)
        self._by_shape.move_to_end(key)
        out = {name: buf[:total] for name, buf in bufs.items()}
        for name, buf in out.items():
            off = 0
            for r in batch:
                buf[off : off + r.items] = r.inputs[name]
                off += r.items
        return out


class _Request:
    __slots__ = ("inputs", "items", "key", "future", "enqueued_ns", "received_ns", "timer", "state", "trace")

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        items: int,
        key: tuple,
        future: asyncio.Future,
        received_ns: int,
        trace: Any = None,
    ) -> None:
        self.inputs = inputs
        self.items = items
        self.key = key  # per-item shapes: only requests with equal keys can be concatenated
        self.future = future
        self.enqueued_ns = time.perf_counter_ns()
        self.received_ns = received_ns
        self.timer: asyncio.TimerHandle | None = None
        self.state = _QUEUED
        self.trace = trace  # server.tracing.Trace when this request is traced


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        version: str,
        instances: Sequence[Backend],
        settings: BatchSettings,
        stats: ModelStats | None = None,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        if not instances:
            raise ValueError("a batcher needs at least one backend instance")
        self.name = name
        self.version = version
        self.instances = list(instances)
        self.settings = settings
        self.stats = stats or ModelStats(name, version)
        self._queue: deque[_Request] = deque()
        self._queued = 0  # live (not dropped) requests in _queue
        self._inflight = 0
        # execution slots: slot -> its instance; one thread and one set of batch buffers per slot
        self._slot_instance = [i for i, b in enumerate(self.instances) for _ in range(max(1, b.concurrent_executions))]
        self._threads = [_InstanceThread(f"exec-{name}-{i}-{k}") for k, i in enumerate(self._slot_instance)]
        self._buffers = [_BatchBuffers() for _ in self._slot_instance]
        # per instance: executions running and their items, and how many it computes at once
        self._running = [0] * len(self.instances)
        self._running_items = [0] * len(self.instances)
        self._computes = [max(1, b.concurrent_executions - 1) for b in self.instances]
        self.fault: str | None = None  # why this model stopped executing (an execution timed out)
        self._on_fault = on_fault
        # free execution slots, the most recently freed last; _slot_freed is set when one is put back
        self._free_slots: list[int] = []
        self._slot_freed: asyncio.Event | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._exec_tasks: set[asyncio.Task] = set()
        self._closing = False
        self._latency = metrics.REQUEST_LATENCY.labels(name, version)
        self._queue_time = metrics.QUEUE_TIME.labels(name, version)
        self._batch_size = metrics.BATCH_SIZE.labels(name, version)
        preferred = sorted({p for p in settings.preferred_batch_sizes if p > 0})
        if settings.max_batch_size:
            preferred = [p for p in preferred if p <= settings.max_batch_size]
        self._preferred = preferred

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start scheduling; call from the event loop that will call `infer`."""
        self._free_slots = list(range(len(self._slot_instance)))
        self._slot_freed = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new requests, execute everything already accepted, then release the thread pool."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            if self.fault is not None:  # nothing is queued, and the scheduler may wait for the hung instance
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._exec_tasks:
            await asyncio.gather(*self._exec_tasks, return_exceptions=True)
        for t in self._threads:
            t.stop()

    @property
    def queued(self) -> int:
        return self._queued

    # -- submission --------------------------------------------------------------------------------------
    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        deadline: float | None = None,
        received_ns: int | None = None,
        trace: Any = None,
    ) -> dict[str, np.ndarray]:
        if received_ns is None:
            received_ns = time.perf_counter_ns()
        if self.fault is not None:
            raise InferError(grpc.StatusCode.UNAVAILABLE, f"model '{self.name}' is not ready: {self.fault}")
        if self._closing or self._task is None:
            raise InferError(grpc.StatusCode.UNAVAILABLE, f"model '{self.name}' is not accepting requests (stopping)")
        s = self.settings
        if s.max_queue_size and self._queued >= s.max_queue_size:
            self.stats.record_failure("REJECTED", time.perf_counter_ns() - received_ns)
            raise InferError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model '{self.name}': queue is full ({s.max_queue_size} requests queued)",
            )
        loop = asyncio.get_running_loop()
        first = next(iter(inputs.values()))
        items = first.shape[0] if s.max_batch_size and first.ndim else 1
        key = tuple((k, v.shape[1:] if s.max_batch_size else v.shape) for k, v in inputs.items())
        req = _Request(inputs, items, key, loop.create_future(), received_ns, trace)
        if deadline is not None:
            if deadline <= loop.time():
                self.stats.never_executed += 1
                self.stats.record_failure("TIMEOUT", time.perf_counter_ns() - received_ns)
                raise InferError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"model '{self.name}': request deadline passed before it was queued",
                )
            req.timer = loop.call_at(deadline, self._expire, req)
        self._queue.append(req)
        self._queued += 1
        self.stats.pending += 1
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            result = await req.future
        except asyncio.CancelledError:
            if req.state == _QUEUED:  # client gone while queued: never executed
                self._drop(req)
                self.stats.record_failure("CANCELED", time.perf_counter_ns() - received_ns)
            raise
        except InferError as exc:
            if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:  # timeouts were counted by _expire
                self.stats.record_failure("BACKEND", time.perf_counter_ns() - received_ns)
            raise
        done = time.perf_counter_ns() - received_ns
        self.stats.success.add(done)
        self._latency.observe(done / 1e9)
        return result

    def _drop(self, req: _Request) -> None:
        req.state = _DROPPED
        self._queued -= 1
        self.stats.pending -= 1
        self.stats.never_executed += 1
        if req.timer is not None:
            req.timer.cancel()

    def _expire(self, req: _Request) -> None:
        if req.state != _QUEUED or req.future.done():
            return
        self._drop(req)
        waited_us = (time.perf_counter_ns() - req.enqueued_ns) // 1000
        self.stats.record_failure("TIMEOUT", time.perf_counter_ns() - req.received_ns)
        req.future.set_exception(
            InferError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"model '{self.name}': request timed out after {waited_us} us in the queue, not executed",
            )
        )

    # -- scheduling --------------------------------------------------------------------------------------
    def _prune_head(self) -> None:
        while self._queue and self._queue[0].state != _QUEUED:
            self._queue.popleft()

    def _candidates(self) -> tuple[list[_Request], int]:
        """Live requests from the head that could share one batch, and their item total."""
        s = self.settings
        if not s.dynamic or not s.max_batch_size:
            head = self._queue[0]
            return [head], head.items
        taken: list[_Request] = []
        total = 0
        key = self._queue[0].key
        for r in self._queue:
            if r.state != _QUEUED:
                continue
            if r.key != key or total + r.items > s.max_batch_size:
                break
            taken.append(r)
            total += r.items
        return taken, total

    def _choose(self, taken: list[_Request]) -> list[_Request]:
        if not self._preferred:
            return taken
        best, total = 0, 0
        for i, r in enumerate(taken):
            total += r.items
            if total in self._preferred:
                best = i + 1
        return taken[:best] if best else taken

    async def _take_slot(self) -> int:
        """A free execution slot on the instance running the fewest executions (with two slots per
        instance, a second batch goes to an idle instance before it queues behind a busy one's run);
        among those the most recently freed, whose thread and buffers are warm. Waits for one if none
        is free."""
        assert self._slot_freed is not None
        while not self._free_slots:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        slot = min(reversed(self._free_slots), key=lambda s: self._running[self._slot_instance[s]])
        self._free_slots.remove(slot)
        return slot

    def _put_slot(self, slot: int) -> None:
        assert self._slot_freed is not None
        self._free_slots.append(slot)
        self._slot_freed.set()

    async def _schedule(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        s = self.settings
        delay_s = s.max_queue_delay_us / 1e6 if s.dynamic and s.max_batch_size else 0.0
        target = max(self._preferred) if self._preferred else s.max_batch_size
        while True:
            self._prune_head()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            slot = await self._take_slot()
            instance = self._slot_instance[slot]
            # Gather: wait for more requests until the batch is full, reaches the largest preferred size,
            # or the oldest request has waited max_queue_delay.
            while True:
                self._prune_head()
                if not self._queue:
                    break
                taken, total = self._candidates()
                oldest_wait = (time.perf_counter_ns() - self._queue[0].enqueued_ns) / 1e9
                remaining = delay_s - oldest_wait
                # len(taken) < queued: the next request cannot join (other shapes, or it would overflow the
                # batch), so waiting longer cannot grow this batch.
                if total >= target or self._closing or len(taken) < self._queued:
                    break
                if remaining <= 0:
                    running = self._running[instance]
                    if running < self._computes[instance] or total * running >= self._running_items[instance]:
                        break
                    # the runtime is saturated: gather on until this batch matches the running ones or one
                    # finishes (_execute sets the wakeup)
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if remaining < _TIMER_RESOLUTION_S:
                    # The instance is idle while it gathers either way; a few event-loop passes cost
                    # less than the extra ~1 ms a rounded-up timer would add to the request.
                    await asyncio.sleep(0)
                    continue
                self._wakeup.clear()
                try:
                    # asyncio.timeout, not wait_for: no extra task per wait on the hot path.
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
            self._prune_head()
            if not self._queue:
                self._put_slot(slot)
                continue
            batch = self._choose(self._candidates()[0])
            for r in batch:
                r.state = _RUNNING
                if r.timer is not None:
                    r.timer.cancel()
            ids = {id(r) for r in batch}
            self._queue = deque(r for r in self._queue if id(r) not in ids and r.state == _QUEUED)
            self._queued -= len(batch)
            # counted at dispatch, not when the task starts: the next slot is chosen by these
            self._running[instance] += 1
            self._running_items[instance] += sum(r.items for r in batch)
            dispatched = time.perf_counter_ns()
            for r in batch:
                q = dispatched - r.enqueued_ns
                self.stats.queue.add(q)
                self._queue_time.observe(q / 1e9)
            # Submitted here, not from the task: the slot's thread starts gathering and running now, an
            # event-loop pass before the task that awaits it first runs.
            submitted = self._threads[slot].submit(
                self._run_batch, self.instances[instance], self._buffers[slot], batch
            )
            task = loop.create_task(self._execute(slot, batch, submitted))
            self._exec_tasks.add(task)
            task.add_done_callback(self._exec_tasks.discard)

    async def _execute(self, slot: int, batch: list[_Request], submitted: Future) -> None:
        """Await the batch `submitted` to the slot's thread; answer its requests, free the slot."""
        instance = self._slot_instance[slot]
        self._inflight += 1
        items = sum(r.items for r in batch)
        hung = False
        try:
            running = asyncio.wrap_future(submitted)
            limit_ms = self.settings.execution_timeout_ms
            if limit_ms:
                limit = asyncio.timeout(limit_ms / 1000)
                try:
                    async with limit:
                        outputs, (t_in, t_infer, t_out) = await running
                except TimeoutError:
                    if not limit.expired():  # the backend's own TimeoutError: a failed execution, no hang
                        raise
                    hung = True
                    raise _ExecutionHung from None
            else:
                outputs, (t_in, t_infer, t_out) = await running
        except _ExecutionHung:
            reason = (
                f"an execution on instance {instance} did not finish within execution_timeout_ms "
                f"({self.settings.execution_timeout_ms} ms); reload the model to serve it again"
            )
            log.error("execution timed out", extra={"model": self.name, "version": self.version, "error": reason})
            for r in batch:
                self.stats.pending -= 1
                if not r.future.done():
                    r.future.set_exception(
                        InferError(grpc.StatusCode.INTERNAL, f"model '{self.name}' execution failed: {reason}")
                    )
            self._set_fault(reason)
        except Exception as exc:  # a backend failure fails this batch's requests, never the server
            log.error("execution failed", extra={"model": self.name, "version": self.version, "error": str(exc)})
            for r in batch:
                self.stats.pending -= 1
                if not r.future.done():
                    r.future.set_exception(
                        InferError(grpc.StatusCode.INTERNAL, f"model '{self.name}' execution failed: {exc}")
                    )
        else:
            self.stats.record_execution(items, len(batch), t_in, t_infer, t_out)
            self._batch_size.observe(items)
            for r, out in zip(batch, outputs, strict=True):
                self.stats.pending -= 1
                if not r.future.done():  # the client may have gone while it ran
                    r.future.set_result(out)
        finally:
            self._inflight -= 1
            self._running[instance] -= 1
            self._running_items[instance] -= items
            assert self._wakeup is not None
            self._wakeup.set()  # a slot gathering while the runtime was saturated may dispatch now
            if not hung:  # a hung slot's thread is still inside the backend: it never takes work again
                self._put_slot(slot)

    def _set_fault(self, reason: str) -> None:
        """Stop serving: fail what is queued, refuse what comes, tell the owner (readiness)."""
        if self.fault is not None:
            return
        self.fault = reason
        for r in list(self._queue):
            if r.state == _QUEUED and not r.future.done():
                self._drop(r)
                r.future.set_exception(
                    InferError(grpc.StatusCode.UNAVAILABLE, f"model '{self.name}' is not ready: {reason}")
                )
        if self._on_fault is not None:
            self._on_fault(reason)

    def _run_batch(
        self, backend: Backend, buffers: _BatchBuffers, batch: list[_Request]
    ) -> tuple[list[dict[str, np.ndarray]], tuple[int, int, int]]:
        """Worker thread: gather, execute, split. Returns per-request outputs and stage timings (ns)."""
        t0 = time.perf_counter_ns()
        reused = len(batch) > 1
        inputs = buffers.gather(batch) if reused else batch[0].inputs  # no copy for a lone request
        with backend.runtime_turn():  # an ONNX Runtime slot waits here while the other one runs
            t1 = time.perf_counter_ns()
            outputs = backend.execute(inputs)
        if reused:  # an output aliasing the buffer (an identity graph) would change under the next batch
            outputs = {
                name: arr.copy() if any(np.may_share_memory(arr, b) for b in inputs.values()) else arr
                for name, arr in outputs.items()
            }
        t2 = time.perf_counter_ns()
        if len(batch) == 1:
            split = [outputs]
        else:
            total = sum(r.items for r in batch)
            for name, arr in outputs.items():
                if arr.ndim == 0 or arr.shape[0] != total:
                    raise RuntimeError(f"output '{name}' has shape {list(arr.shape)}; expected batch {total} first")
            split, off = [], 0
            for r in batch:
                split.append({name: arr[off : off + r.items] for name, arr in outputs.items()})
                off += r.items
        t3 = time.perf_counter_ns()
        for r in batch:
            if r.trace is not None:
                r.trace.computed(r.enqueued_ns, t0, t1, t2, t3)
        return split, (t1 - t0, t2 - t1, t3 - t2)
