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
import os
import signal
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import SLOW_WIDTH, ServerProcess, affine_model, parse_metrics, slow_model, write_model
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
    write_model(repo, "slow", slow_model(iterations=10),
                f'backend: "test_faulty"\ndefault_model_filename: "model.onnx"\nmax_batch_size: 4\n'
                f'dynamic_batching {{ }}\nparameters {{ key: "gate_file" value {{ string_value: "{gate.path}" }} }}\n')
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
        inflight = {k: v for k, v in (await asyncio.to_thread(srv.scrape)).items() if k[0] == "cnnserve_inflight_requests"}
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
        assert all(x > y for x, y in zip(after, before, strict=True)), f"one worker served them all: {before} -> {after}"
        with tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) as c:
            c.unregister_system_shared_memory("ab")
        for _ in range(8):
            with (tc.InferenceServerClient(srv.grpc_url, channel_args=SEPARATE_CONNECTION) as c,
                  pytest.raises(InferenceServerException, match="not registered")):
                c.infer("affine", ins)
    finally:
        shm.destroy_shared_memory_region(handle)


def test_a_worker_that_dies_stops_the_server(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\n")
    srv = server_factory(repo, "--workers", "2")
    victim, survivor = srv.ready["workers"]
    os.kill(victim["pid"], signal.SIGKILL)
    assert srv.proc.wait(60) == 1, srv.log()
    assert "a worker exited" in srv.log()
    assert not Path(f"/proc/{survivor['pid']}").exists()
