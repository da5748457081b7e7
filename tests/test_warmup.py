"""Triton's model_warmup: samples from zero, random and file data, checked against the model; they run on
every instance while the model is LOADING (not ready), and a failing sample fails the load alone.
The exported config carries a warm-up for the batch sizes the model serves and a queue bound."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc

from cnncore.config import load_config
from cnncore.wire import serialize_bytes
from conftest import ROOT, affine_model, strings_model, write_model
from fault_backends import FileGate
from protos import model_config_pb2 as mc
from server import warmup
from server.errors import InferError
from server.repository import ModelRepository

pytestmark = pytest.mark.timeout(120)

AFFINE_WARMUP = """max_batch_size: 8
input [{ name: "a" data_type: TYPE_FP32 dims: [4] }, { name: "b" data_type: TYPE_INT64 dims: [2] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] }, { name: "z" data_type: TYPE_INT64 dims: [2] }]
model_warmup [
  { name: "zeros" batch_size: 1
    inputs { key: "a" value { data_type: TYPE_FP32 dims: [4] zero_data: true } }
    inputs { key: "b" value { data_type: TYPE_INT64 dims: [2] zero_data: true } } },
  { name: "random" batch_size: 8 count: 2
    inputs { key: "a" value { data_type: TYPE_FP32 dims: [4] random_data: true } }
    inputs { key: "b" value { data_type: TYPE_INT64 dims: [2] random_data: true } } },
  { name: "file" batch_size: 2
    inputs { key: "a" value { data_type: TYPE_FP32 dims: [4] input_data_file: "a.bin" } }
    inputs { key: "b" value { data_type: TYPE_INT64 dims: [2] zero_data: true } } }
]
"""
A_FILE = np.arange(8, dtype=np.float32).reshape(2, 4)


def _affine_dir(tmp_path: Path, config: str = AFFINE_WARMUP) -> Path:
    d = write_model(tmp_path, "warm", affine_model(), config)
    (d / "warmup").mkdir()
    (d / "warmup" / "a.bin").write_bytes(A_FILE.tobytes())
    return d


def test_samples_from_zero_random_and_file_data(tmp_path: Path) -> None:
    d = _affine_dir(tmp_path)
    samples = {s.name: s for s in warmup.samples(load_config(d), d)}
    assert [(s.name, s.count) for s in samples.values()] == [("zeros", 1), ("random", 2), ("file", 1)]
    z, r, f = samples["zeros"].inputs, samples["random"].inputs, samples["file"].inputs
    assert z["a"].shape == (1, 4) and z["a"].dtype == np.float32 and not z["a"].any()
    assert r["a"].shape == (8, 4) and r["b"].shape == (8, 2) and r["b"].dtype == np.int64 and r["a"].any()
    np.testing.assert_array_equal(f["a"], A_FILE)


def test_bytes_samples(tmp_path: Path) -> None:
    d = write_model(
        tmp_path,
        "s",
        strings_model(),
        'max_batch_size: 0\ninput [{ name: "s" data_type: TYPE_STRING '
        'dims: [3] }]\nmodel_warmup [{ name: "f" inputs { key: "s" value { data_type: TYPE_STRING '
        'dims: [3] input_data_file: "s.bin" } } }]\n',
    )
    (d / "warmup").mkdir()
    (d / "warmup" / "s.bin").write_bytes(serialize_bytes(np.array([b"x", b"", b"yz"], dtype=object)))
    (sample,) = warmup.samples(load_config(d), d)
    assert sample.inputs["s"].tolist() == [b"x", b"", b"yz"]


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda c: c.replace("batch_size: 8 count", "batch_size: 9 count"), "batch_size 9 exceeds max_batch_size 8"),
        (
            lambda c: c.replace(
                'key: "b" value { data_type: TYPE_INT64 dims: [2] zero_data: true } } },\n  { name: "random"',
                '} },\n  { name: "random"',
            ),
            "missing ['b']",
        ),
        (lambda c: c.replace('"a.bin"', '"absent.bin"'), "cannot read"),
        (lambda c: c.replace('"a.bin"', '"../config.pbtxt"'), "must name a file inside"),
        (lambda c: c.replace("dims: [4] zero_data", "dims: [5] zero_data"), "dims [5] do not fit the model's [4]"),
        (
            lambda c: c.replace("TYPE_FP32 dims: [4] random", "TYPE_FP16 dims: [4] random"),
            "TYPE_FP16, the model's is TYPE_FP32",
        ),
    ],
)
def test_bad_samples_fail_that_model_with_a_reason(tmp_path: Path, edit, fragment: str) -> None:
    _affine_dir(tmp_path, edit(AFFINE_WARMUP))
    write_model(tmp_path, "other", affine_model(), "max_batch_size: 4\n")

    async def main() -> ModelRepository:
        r = ModelRepository(tmp_path)
        await r.load_all()
        return r

    repo = asyncio.run(main())
    state = repo.models["warm"]
    assert state.state == "UNAVAILABLE" and "warm-up sample" in state.reason and fragment in state.reason, state.reason
    with pytest.raises(InferError) as err:
        repo.get("warm")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert repo.models["other"].state == "READY"


def test_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    d = _affine_dir(tmp_path)
    (d / "warmup" / "a.bin").write_bytes(b"\0" * 12)
    with pytest.raises(warmup.WarmupError, match="holds 12 bytes; FP32 \\[2, 4\\] needs 32"):
        warmup.samples(load_config(d), d)


def _gated_config(gate: FileGate) -> str:
    return (
        f'backend: "test_faulty"\ndefault_model_filename: "model.onnx"\ninstance_group [{{ count: 2 }}]\n'
        f'parameters {{ key: "gate_file" value {{ string_value: "{gate.path}" }} }}\n' + AFFINE_WARMUP
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_and_model_turn_ready_only_after_every_instance_warmed_up(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    gate = FileGate(tmp_path / "gate")
    gate.close()
    _affine_dir(repo, _gated_config(gate))
    port = _free_port()
    ready_file = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "server.log", "w") as log:  # the server writes to its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--model-repository",
                str(repo),
                "--grpc-address",
                "127.0.0.1",
                "--grpc-port",
                str(port),
                "--metrics-port",
                "0",
                "--metrics-address",
                "127.0.0.1",
                "--allow-http",
                "false",
                "--ready-file",
                str(ready_file),
                "--backend-module",
                "fault_backends",
                "--strict-readiness",
                "true",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        gate.wait_entered(1)  # the first warm-up execution is held: the model is loading
        assert client.is_server_live()
        assert not client.is_server_ready() and not client.is_model_ready("warm")
        assert not ready_file.exists()
        gate.open()
        while not ready_file.exists():  # written once every model loaded (strict readiness)
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.01)
        assert client.is_server_ready() and client.is_model_ready("warm")
        # 2 instances x (zeros once + random twice + file once)
        assert gate.entered() == 2 * (1 + 2 + 1)
        out = client.infer(
            "warm", [_inp("a", np.ones((1, 4), np.float32), "FP32"), _inp("b", np.zeros((1, 2), np.int64), "INT64")]
        )
        np.testing.assert_array_equal(out.as_numpy("y"), np.full((1, 4), 3.0, np.float32))
        stats = client.get_inference_statistics("warm").model_stats[0]
        assert stats.execution_count == 1  # warm-up executions are not inference statistics (as Triton)
    finally:
        gate.open()
        proc.terminate()
        proc.wait(30)


def _inp(name: str, arr: np.ndarray, datatype: str) -> tc.InferInput:
    i = tc.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr)
    return i


def test_export_writes_warmup_for_served_batch_sizes_and_a_queue_bound(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from export.batch_sizing import BatchPins, apply_sizing, size_batches
    from export.repository import BatchingDefaults, build_config, default_queue_size, warmup_batch_sizes

    g = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["out"])],
        "r",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    # Before anything is measured (build_config alone): batch 1 and every preferred size
    assert warmup_batch_sizes(16) == [1, 16] and warmup_batch_sizes(4, (2, 4, 8)) == [1, 2, 4]
    cfg = build_config("r", model, 16, BatchingDefaults(instance_count=2))
    assert [w.batch_size for w in cfg.model_warmup] == warmup_batch_sizes(16, (4, 8, 16)) == [1, 4, 8, 16]
    narrow = build_config("r", model, 16, BatchingDefaults(preferred_batch_sizes=(2, 4)))
    assert [w.batch_size for w in narrow.model_warmup] == warmup_batch_sizes(16, (2, 4)) == [1, 2, 4]
    # What export writes from a measured curve (export/batch_sizing.py): the sizes up to the machine's
    # knee at 4 are preferred and warmed up; max_batch_size 8, the queue bound follows it
    sizing = size_batches({1: 100.0, 2: 150.0, 4: 196.0, 8: 200.0, 16: 199.0}, BatchPins(ceiling=16))
    apply_sizing(cfg, sizing)
    assert cfg.max_batch_size == 8 and list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert [w.batch_size for w in cfg.model_warmup] == [1, 2, 4]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert "preferred up to 4" in cfg.parameters["batch_sizing"].string_value  # why, for describe and the server
    for w in cfg.model_warmup:
        (inp,) = w.inputs.items()
        assert inp[0] == "input" and list(inp[1].dims) == [3, 8, 8] and inp[1].random_data
        assert inp[1].data_type == mc.TYPE_FP32
    # The queue bound: two full batches per instance, not below 64 (concurrency-32 clients keep working)
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == default_queue_size(8, 2) == 64
    assert default_queue_size(32, 2) == 128
    # What export writes, the server runs: the config loads and warms up on a real ONNX Runtime session.
    d = tmp_path / "r"
    (d / "1").mkdir(parents=True)
    onnx.save(model, d / "1" / "model.onnx")
    from cnncore.config import render_config

    (d / "config.pbtxt").write_text(render_config(cfg))

    async def main() -> ModelRepository:
        r = ModelRepository(tmp_path)
        await r.load_all()
        return r

    repo = asyncio.run(main())
    assert repo.models["r"].state == "READY", repo.models["r"].reason
