"""SIGTERM with requests in flight: readiness turns false, new requests are refused, none accepted is lost."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from conftest import SLOW_WIDTH, slow_model, write_model
from fault_backends import FileGate

pytestmark = pytest.mark.timeout(180)


def test_sigterm_answers_every_accepted_request(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    gate = FileGate(tmp_path / "gate")
    gate.close()  # every execution is held until the test has seen the server draining
    write_model(
        repo,
        "slow",
        slow_model(iterations=10),
        f'backend: "test_faulty"\ndefault_model_filename: "model.onnx"\nmax_batch_size: 4\n'
        f'dynamic_batching {{ }}\nparameters {{ key: "gate_file" value {{ string_value: "{gate.path}" }} }}\n',
    )
    srv = server_factory(repo, "--backend-module", "fault_backends")
    n = 8

    async def main():
        async with tca.InferenceServerClient(srv.grpc_url) as c:

            async def one(i: int):
                x = np.full((1, SLOW_WIDTH), i / n, np.float32)
                inp = tc.InferInput("x", [1, SLOW_WIDTH], "FP32")
                inp.set_data_from_numpy(x)
                r = await c.infer("slow", [inp], request_id=str(i))
                return i, r.as_numpy("y")

            await c.is_server_ready()
            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            await srv.wait_pending("slow", n)  # all accepted; the first batch is executing, the rest queued
            await asyncio.to_thread(gate.wait_entered, 1)
            srv.proc.send_signal(signal.SIGTERM)
            sync = tc.InferenceServerClient(srv.grpc_url)
            # The batches are held by the gate, so the server is draining until the test opens it.
            ready_during_drain = sync.is_server_ready()
            while ready_during_drain:  # until the signal is handled
                ready_during_drain = sync.is_server_ready()
            model_ready_during_drain = sync.is_model_ready("slow")
            late = tc.InferInput("x", [1, SLOW_WIDTH], "FP32")
            late.set_data_from_numpy(np.zeros((1, SLOW_WIDTH), np.float32))
            try:
                sync.infer("slow", [late])
                late_error = None
            except InferenceServerException as exc:
                late_error = exc
            gate.open()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return results, ready_during_drain, model_ready_during_drain, late_error

    results, ready_during_drain, model_ready_during_drain, late_error = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert sorted(i for i, _ in results) == list(range(n))
    assert all(y.shape == (1, SLOW_WIDTH) for _, y in results)
    assert ready_during_drain is False and model_ready_during_drain is False
    assert late_error is not None and late_error.status() == "StatusCode.UNAVAILABLE", late_error
    rc = srv.proc.wait(30)  # raises if the process has not exited within 30 s
    assert rc == 0, srv.log()
    records = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    shutdown = next(r for r in records if r["msg"].startswith("shutting down"))
    assert shutdown["inflight"] >= 4, "SIGTERM must arrive while requests are in flight"
    assert records[-1]["msg"] == "server stopped"
