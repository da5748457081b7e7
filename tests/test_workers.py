"""`--workers 2`: two server processes on one port, one merged metrics view, shared-memory regions
usable through either worker, one drain on SIGTERM.

Connections are spread by the kernel (SO_REUSEPORT hashes each connection), so the test opens many
separate connections (a local subchannel pool per client) and checks through each worker's own
metrics endpoint that both served, and through the supervisor's endpoint that the merged counts are
the sums. Executions are held behind a file gate (tests/fault_backends.py) so SIGTERM provably arrives
while both workers hold accepted requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import SLOW_WIDTH, ServerProcess, affine_model, parse_metrics, slow_model, start_server, write_model
from fault_backends import FileGate

pytestmark = pytest.mark.timeout(240)

SEPARATE_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per client


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    return parse_metrics(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())


def _affine(client: tc.InferenceServerClient, i: int) -> None:
    a = np.full((1, 4), i, np.float32)
    ins = [tc.InferInput("a", [1, 4], "FP32"), tc.InferInput("b", [1, 2], "INT64")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(np.full((1, 2), i, np.int64))
    np.testing.assert_array_equal(client.infer("affine", ins).as_numpy("y"), 2 * a + 1)


@pytest.fixture
def gated(tmp_path: Path, server_factory) -> tuple[ServerProcess, FileGate]:
    repo = tmp_path / "repo"
    gate = FileGate(tmp_path / "gate")
    gate.open()
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\ndynamic_batching { }\n")
    write_model(
        repo,
        "slow",
        slow_model(iterations=10),
        f'backend: "test_faulty"\ndefault_model_filename: "model.onnx"\nmax_batch_size: 4\n'
        f'dynamic_batching {{ }}\nparameters {{ key: "gate_file" value {{ string_value: "{gate.path}" }} }}\n',
    )
    return server_factory(repo, "--workers", "2", "--backend-module", "fault_backends"), gate


def test_two_workers_serve_one_port_with_merged_metrics_and_drain_together(gated) -> None:
    srv, gate = gated
    workers = srv.ready["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2

    n = 24
    for i in range(n):
        with tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) as c:
            _affine(c, i)
    key = ("nv_inference_request_success", (("model", "affine"), ("version", "1")))
    per_worker = [_scrape(w["metrics_port"]).get(key, 0.0) for w in workers]
    assert all(v > 0 for v in per_worker), f"connections reached only one worker: {per_worker}"
    merged = srv.scrape()
    assert merged[key] == sum(per_worker) == n
    for _ in range(4):  # the REST binding shares its port the same way
        ready = urllib.request.urlopen(f"http://127.0.0.1:{srv.ready['http_port']}/v2/health/ready", timeout=10)
        assert ready.status == 200
    # The histograms come through prometheus_client's multiprocess mode, summed over both processes.
    assert merged[("cnnserve_request_latency_seconds_count", (("model", "affine"), ("version", "1")))] == n

    _shared_memory_is_shared_by_the_workers(srv)

    # SIGTERM while both workers hold accepted requests: every one is answered, then all exit.
    gate.close()
    m = 16  # on separate connections: both workers hold some (all on one: 2 in 65536)

    async def main():
        clients = [tca.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) for _ in range(m)]

        async def one(i: int):
            inp = tc.InferInput("x", [1, SLOW_WIDTH], "FP32")
            inp.set_data_from_numpy(np.full((1, SLOW_WIDTH), i / m, np.float32))
            r = await clients[i].infer("slow", [inp])
            return i, r.as_numpy("y")

        tasks = [asyncio.create_task(one(i)) for i in range(m)]
        await srv.wait_pending("slow", m)  # the merged pending gauge: all m accepted across the workers
        pending = ("nv_inference_pending_request_count", (("model", "slow"), ("version", "1")))
        held = [_scrape(w["metrics_port"]).get(pending, 0.0) for w in workers]
        # The admission gauge is one series in the merged view: the sum over the workers (livesum).
        inflight = {
            k: v for k, v in (await asyncio.to_thread(srv.scrape)).items() if k[0] == "cnnserve_inflight_requests"
        }
        assert inflight == {("cnnserve_inflight_requests", ()): m}, inflight
        srv.proc.send_signal(signal.SIGTERM)
        # Each worker drains: it refuses new work once the signal reaches it, and reports not ready.
        late_errors = []
        for _ in range(4):
            late = tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION)
            while late.is_server_ready():  # until the forwarded signal reaches this connection's worker
                pass
            try:
                _affine(late, 0)
            except InferenceServerException as exc:
                late_errors.append(exc.status())
            late.close()
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.close()
        return results, held, late_errors

    results, held, late_errors = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert sorted(i for i, _ in results) == list(range(m))
    assert sum(held) == m
    assert late_errors == ["StatusCode.UNAVAILABLE"] * 4
    assert srv.proc.wait(60) == 0, srv.log()
    assert not any(Path(f"/proc/{w['pid']}").exists() for w in workers)  # reaped: none outlives the supervisor


def _shared_memory_is_shared_by_the_workers(srv: ServerProcess) -> None:
    """A region registered over one connection serves requests over connections to either worker, and
    an unregister over another connection takes effect in both."""
    a, b = np.arange(4, dtype=np.float32).reshape(1, 4), np.arange(2, dtype=np.int64).reshape(1, 2)
    key = f"/cnnserve_test_workers_{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region("ab", key, a.nbytes + b.nbytes, create_only=True)
    try:
        shm.set_shared_memory_region(handle, [a, b])
        with tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) as c:
            c.register_system_shared_memory("ab", key, a.nbytes + b.nbytes)
        success = ("nv_inference_request_success", (("model", "affine"), ("version", "1")))
        before = [_scrape(w["metrics_port"]).get(success, 0.0) for w in srv.ready["workers"]]
        for _ in range(16):
            with tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) as c:
                assert "ab" in c.get_system_shared_memory_status().regions
                ins = [tc.InferInput("a", [1, 4], "FP32"), tc.InferInput("b", [1, 2], "INT64")]
                ins[0].set_shared_memory("ab", a.nbytes)
                ins[1].set_shared_memory("ab", b.nbytes, offset=a.nbytes)
                np.testing.assert_array_equal(c.infer("affine", ins).as_numpy("y"), 2 * a + 1)
        after = [_scrape(w["metrics_port"]).get(success, 0.0) for w in srv.ready["workers"]]
        assert all(x > y for x, y in zip(after, before, strict=True)), (
            f"one worker served them all: {before} -> {after}"
        )
        with tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) as c:
            c.unregister_system_shared_memory("ab")
        for _ in range(8):
            with (
                tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) as c,
                pytest.raises(InferenceServerException, match="not registered"),
            ):
                c.infer("affine", ins)
    finally:
        shm.destroy_shared_memory_region(handle)


def _ready(srv: ServerProcess) -> dict:
    """The supervisor's ready file now (rewritten when a worker is replaced)."""
    return json.loads((srv.log_path.parent / "ready.json").read_text())


def _until(what: str, check, polls: int = 3000) -> None:
    """Poll observable state (ready file, metrics) until `check()`; bounded, no clock in the assertion."""
    for _ in range(polls):
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"never observed: {what}")


def _replaced(srv: ServerProcess, old_pid: int) -> None:
    """Until the ready file lists two serving workers and not `old_pid` (its replacement serves)."""

    def done() -> bool:
        pids = [w["pid"] for w in _ready(srv)["workers"]]
        return len(pids) == 2 and old_pid not in pids

    _until(f"worker {old_pid} replaced", done)


def _infer_retrying_connection_errors(srv: ServerProcess, i: int, tries: int = 20) -> int:
    """One request as a client would send it after a server process died: retried only when the
    connection fails (UNAVAILABLE); any other error fails the test. Returns the attempts used."""
    for attempt in range(1, tries + 1):
        try:
            with tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) as c:
                _affine(c, i)
            return attempt
        except InferenceServerException as exc:
            if exc.status() != "StatusCode.UNAVAILABLE":
                raise
    raise AssertionError(f"request {i} failed {tries} times on connection errors")


def test_a_killed_worker_is_restarted_while_the_other_keeps_answering(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\n")
    srv = server_factory(repo, "--workers", "2")
    restarts = ("cnnserve_worker_restarts_total", (("worker", "0"),))
    assert _scrape(srv.metrics_port)[restarts] == 0
    assert _scrape(srv.metrics_port)[("cnnserve_workers_ready", ())] == 2
    victim, survivor = srv.ready["workers"]
    os.kill(victim["pid"], signal.SIGKILL)
    for i in range(30):  # while the victim is dead and while its successor starts
        _infer_retrying_connection_errors(srv, i)
    assert srv.proc.poll() is None, srv.log()
    _until(
        "worker 0 restarted and serving",
        lambda: (
            _scrape(srv.metrics_port).get(restarts) == 1
            and _scrape(srv.metrics_port).get(("cnnserve_workers_ready", ())) == 2
        ),
    )
    _replaced(srv, victim["pid"])
    new = next(w for w in _ready(srv)["workers"] if w["pid"] not in (victim["pid"], survivor["pid"]))
    success = ("nv_inference_request_success", (("model", "affine"), ("version", "1")))
    for i in range(32):  # separate connections: the kernel spreads them over both workers again
        assert _infer_retrying_connection_errors(srv, i) == 1
    assert _scrape(new["metrics_port"]).get(success, 0) > 0, "the restarted worker served nothing"
    assert _scrape(srv.metrics_port)[restarts] == 1
    assert "a worker exited; restarting it" in srv.log() and "worker restarted" in srv.log()
    assert srv.terminate() == 0, srv.log()  # SIGTERM drains both, the replacement included
    assert not any(Path(f"/proc/{w['pid']}").exists() for w in _ready(srv)["workers"])


def test_a_crash_loop_stops_the_server_with_one_message(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\n")
    srv = server_factory(repo, "--workers", "2", "--worker-crash-limit", "3", "--worker-crash-window-secs", "600")
    pid = srv.ready["workers"][0]["pid"]
    for death in range(1, 3):  # two deaths: each worker comes back
        os.kill(pid, signal.SIGKILL)
        _replaced(srv, pid)
        pid = _ready(srv)["workers"][0]["pid"]  # listed by worker slot
        assert _scrape(srv.metrics_port)[("cnnserve_worker_restarts_total", (("worker", "0"),))] == death
    survivor = srv.ready["workers"][1]["pid"]
    os.kill(pid, signal.SIGKILL)  # the third within the window
    assert srv.proc.wait(60) == 1, srv.log()
    log = srv.log()
    assert log.count("crash-looping") == 1 and "3 exits within 600 s" in log and "--worker-crash-limit 3" in log
    assert not Path(f"/proc/{survivor}").exists()


def test_a_worker_that_cannot_start_stops_the_server_without_retrying(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\n")
    with pytest.raises(RuntimeError, match="exited with 1") as ei:
        start_server(repo, tmp_path, "--workers", "2", "--backend-module", "cnnserve_no_such_module")
    assert "a worker exited before it served" in str(ei.value) and "restarting" not in str(ei.value)


def test_crash_loop_flags_are_checked(tmp_path: Path) -> None:
    for flags in (["--worker-crash-limit", "0"], ["--worker-crash-window-secs", "0"]):
        res = subprocess.run(
            [sys.executable, "-m", "server", "--model-repository", str(tmp_path), "--workers", "2", *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode != 0 and "--worker-crash-limit must be >= 1" in res.stderr, res.stderr
