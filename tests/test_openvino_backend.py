"""The OpenVINO backend against ONNX Runtime: small graphs, the loader, a graph OpenVINO cannot compile,
and every model of the default repository (its FP32 file across runtimes, its served variant against
the same runtime and precision in this process).

Tolerances, stated once: FP32 graphs agree within 1e-4 of the output's largest magnitude (two
runtimes' float kernels sum in different orders). A served INT8 or BF16 variant against its own
runtime in this process: within 5% of the output's largest magnitude (the same kernels; the server's
bounded dynamic batch may pick others). Detection outputs (box lists after NMS) are compared as
detections instead: every detection the reference scores above 0.5 has a twin of the same label with
IoU >= 0.75.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import affine_model, pool_model, write_model
from server import variant_choice
from server.backends.base import BackendOptions
from server.backends.openvino_backend import OpenVinoBackend
from server.backends.ort_backend import OrtBackend
from server.repository import ModelRepository

pytest.importorskip("openvino")
pytestmark = pytest.mark.timeout(600)

FP32_RTOL = 1e-4
INT8_RTOL = 5e-2


def _pair(path: Path, **kw) -> tuple[OrtBackend, OpenVinoBackend]:
    options = BackendOptions(intra_op_threads=2, max_batch_size=kw.pop("max_batch_size", 8), **kw)
    return OrtBackend(path, options), OpenVinoBackend(path, options)


def _close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    )
    scale = max(float(np.max(np.abs(want))), 1.0) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=what)


def test_same_outputs_and_specs_as_onnxruntime_on_small_graphs(tmp_path: Path) -> None:
    p = tmp_path / "affine.onnx"
    p.write_bytes(affine_model())
    ort_b, ov_b = _pair(p)
    assert ov_b.inputs == ort_b.inputs and ov_b.outputs == ort_b.outputs
    rng = np.random.default_rng(0)
    for batch in (1, 3, 8):  # dynamic batch, bounded by max_batch_size
        feed: dict[str, np.ndarray] = {
            "a": rng.standard_normal((batch, 4)).astype(np.float32),
            "b": rng.integers(-9, 9, (batch, 2)),
        }
        want, got = ort_b.execute(feed), ov_b.execute(feed)
        for k in want:
            _close(got[k], want[k], FP32_RTOL, f"affine.{k} batch {batch}")


def test_a_batch_over_the_bound_is_refused_by_the_data_plane(tmp_path: Path) -> None:
    """The batch bound is checked once, by the data plane, before an OpenVINO request is touched."""
    import grpc

    from server.dataplane.plane import DataPlane
    from server.dataplane.state import ServerState
    from server.dataplane.tensors import TensorIn
    from server.errors import InferError

    write_model(tmp_path, "affine", affine_model(), 'backend: "openvino"\nmax_batch_size: 8\ndynamic_batching { }\n')

    async def refused() -> InferError:
        repo = ModelRepository(tmp_path)
        await repo.load_all()
        assert isinstance(repo.get("affine").instances[0], OpenVinoBackend)
        state = ServerState()
        state.started = True
        plane = DataPlane(repo, state, vision_threads=1)
        a, b = np.zeros((9, 4), np.float32), np.zeros((9, 2), np.int64)
        try:
            with pytest.raises(InferError) as err:
                await plane.normalize(
                    "affine",
                    "",
                    [TensorIn("a", "FP32", a.shape, raw=a.tobytes()), TensorIn("b", "INT64", b.shape, raw=b.tobytes())],
                )
            return err.value
        finally:
            plane.close()
            await repo.close()

    err = asyncio.run(refused())
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'a': batch size 9 exceeds max_batch_size 8" in err.message, err.message


def test_threads_from_the_config_reach_openvino(tmp_path: Path) -> None:
    p = tmp_path / "pool.onnx"
    p.write_bytes(pool_model())
    one = OpenVinoBackend(p, BackendOptions(intra_op_threads=1, max_batch_size=4))
    assert int(one.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    own = OpenVinoBackend(p, BackendOptions(extra=(("INFERENCE_NUM_THREADS", "2"),), max_batch_size=4))
    assert int(own.compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    # FP32 stays FP32 on CPUs with bfloat16 support
    assert "float32" in str(one.compiled.get_property("INFERENCE_PRECISION_HINT"))
    # the server's default: threads unpinned (its cores are shared with its own threads and neighbours)
    assert one.properties["ENABLE_CPU_PINNING"] == "False" and one.properties["PERFORMANCE_HINT"] == "LATENCY"


def _scale_model(k: float) -> bytes:
    """x FP32 [N,4] -> y = k x: one graph, other weights per k."""
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [k])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def test_compiled_model_cache_is_keyed_by_the_model_file(tmp_path: Path) -> None:
    model = tmp_path / "m" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    cache = tmp_path / ".cache"
    options = BackendOptions(intra_op_threads=1, max_batch_size=4, cache_dir=cache)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    def load_and_run() -> np.ndarray:
        b = OpenVinoBackend(model, options)
        try:
            return b.execute({"x": x})["y"]
        finally:
            b.close()

    def cached() -> dict[str, list[str]]:
        return {d.name: sorted(f.name for f in d.iterdir()) for d in (cache / "openvino").iterdir()}

    model.write_bytes(_scale_model(2.0))
    np.testing.assert_array_equal(load_and_run(), x * 2)
    first = cached()
    assert len(first) == 1 and any(f.endswith(".blob") for f in next(iter(first.values()))), first
    np.testing.assert_array_equal(load_and_run(), x * 2)  # a second load reads the blob it wrote
    assert cached() == first
    model.write_bytes(_scale_model(3.0))  # the file changes in place: another key, never the old blob
    np.testing.assert_array_equal(load_and_run(), x * 3)
    after = cached()
    assert len(after) == 2 and set(first) < set(after)


def test_spare_infer_requests_take_executions_at_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    p = tmp_path / "affine.onnx"
    p.write_bytes(affine_model())
    ov_b = OpenVinoBackend(p, BackendOptions(intra_op_threads=1, max_batch_size=8))
    streams = int(ov_b.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    assert ov_b.concurrent_executions == streams + 1 >= 2
    rng = np.random.default_rng(1)
    # read-only views, as requests arrive from the message bytes: shared with OpenVINO, not copied
    feeds: list[dict[str, np.ndarray]] = [
        {
            "a": np.frombuffer(rng.standard_normal((n, 4)).astype(np.float32).tobytes(), np.float32).reshape(n, 4),
            "b": rng.integers(-9, 9, (n, 2)),
        }
        for n in (1, 3, 8, 2) * 8
    ]
    with ThreadPoolExecutor(ov_b.concurrent_executions) as pool:
        outs = list(pool.map(ov_b.execute, feeds))
    for feed, out in zip(feeds, outs, strict=True):
        np.testing.assert_allclose(out["y"], feed["a"] * 2 + 1, rtol=1e-6)
        np.testing.assert_array_equal(out["z"], feed["b"] + 3)


def test_warm_up_reaches_every_infer_request(tmp_path: Path) -> None:
    """A sample warms each infer request, not only the one `execute` would take: the spare ones would
    otherwise allocate for that batch shape on their first batches under load."""
    p = tmp_path / "affine.onnx"
    p.write_bytes(affine_model())
    ov_b = OpenVinoBackend(p, BackendOptions(intra_op_threads=1, max_batch_size=8))
    sample: dict[str, np.ndarray] = {"a": np.ones((5, 4), np.float32), "b": np.ones((5, 2), np.int64)}
    assert ov_b.warm_up(sample) == ov_b.concurrent_executions >= 2
    requests = list(ov_b._requests.queue)
    assert len(requests) == ov_b.concurrent_executions  # every request is back for the batcher
    port = ov_b._input_ports["a"][0]
    assert [tuple(r.get_tensor(port).shape) for r in requests] == [(5, 4)] * len(requests)
    # execute alone touches one: the reason warm-up cannot simply call it
    ov_b.execute({"a": np.ones((3, 4), np.float32), "b": np.ones((3, 2), np.int64)})
    assert sorted(tuple(r.get_tensor(port).shape) for r in ov_b._requests.queue).count((3, 4)) == 1


def _unknown_op_model() -> bytes:
    """A graph ONNX Runtime and OpenVINO both parse but OpenVINO has no kernel for: a custom-domain op."""
    g = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    return m.SerializeToString()


def test_a_model_openvino_cannot_compile_fails_alone_with_the_reason(tmp_path: Path) -> None:
    ov_cfg = 'max_batch_size: 4\nbackend: "openvino"\n'
    write_model(tmp_path, "good", affine_model(), ov_cfg)
    write_model(tmp_path, "plain", affine_model(), "max_batch_size: 4\n")
    write_model(tmp_path, "bad", _unknown_op_model(), ov_cfg)

    async def main() -> ModelRepository:
        r = ModelRepository(tmp_path)
        await r.load_all()
        return r

    repo = asyncio.run(main())
    assert repo.models["good"].state == "READY" and repo.models["plain"].state == "READY"
    assert repo.models["bad"].state == "UNAVAILABLE"
    reason = repo.models["bad"].reason
    assert "openvino could not compile" in reason and "Frobnicate" in reason, reason
    served = repo.get("good")
    assert served.platform == "openvino" and isinstance(served.instances[0], OpenVinoBackend)
    # the compiled-model cache sits beside the models and is never taken for one
    assert any((tmp_path / ".cache" / "openvino").iterdir()) and ".cache" not in repo.models
    out = served.instances[0].execute({"a": np.ones((2, 4), np.float32), "b": np.ones((2, 2), np.int64)})
    np.testing.assert_allclose(out["y"], 3.0)


def _detections_match(got: dict, want: dict, what: str) -> None:
    from models.detection.evaluate import box_iou_np

    for i in range(len(want["num_detections"])):
        kw, kg = int(want["num_detections"][i]), int(got["num_detections"][i])
        confident = want["scores"][i, :kw] > 0.5
        wb, wl = want["boxes"][i, :kw][confident], want["labels"][i, :kw][confident]
        gb, gl = got["boxes"][i, :kg], got["labels"][i, :kg]
        iou = box_iou_np(wb, gb)
        for j in range(len(wb)):  # every confident detection has a twin: same label, IoU >= 0.75
            twins = (iou[j] >= 0.75) & (gl == wl[j])
            assert twins.any(), f"{what}: image {i} detection {j} ({wl[j]}) has no OpenVINO twin"


@pytest.mark.slow
@pytest.mark.precision
def test_every_default_model_matches_onnxruntime(default_repository: Path) -> None:
    """Per default model: the FP32 file on OpenVINO (f32) against ONNX Runtime, and the served variant
    through the server's backend against the same runtime and precision in this process. INT8 and BF16
    are never compared across runtimes here: their kernels round differently per CPU (measured on AMX:
    OpenVINO INT8 vs ONNX Runtime INT8 differ by 6.05 on logits of magnitude 15.6); the accuracy gate
    compares those through the task's metric (tests/test_quantize.py)."""
    from cnncore.config import load_config
    from cnncore.spec import ModelMeta
    from export.runtimes import served_runner
    from export.variants import FP32_FILENAME
    from models.data.calibration import calibration_inputs

    names = sorted(p.name for p in default_repository.iterdir() if (p / "config.pbtxt").is_file())
    assert names
    for name in names:
        d = default_repository / name
        meta = ModelMeta.read(d)
        cfg = load_config(d)
        # real inputs of the task (held apart from nothing: agreement, not accuracy, is tested here)
        x = calibration_inputs(name, meta.preprocess)[0][:4]
        fp32 = d / "1" / FP32_FILENAME
        ort_b, ov_b = _pair(fp32, max_batch_size=32)
        assert [s.name for s in ov_b.inputs] == [s.name for s in ort_b.inputs], name
        assert ov_b.outputs == ort_b.outputs or meta.task.value == "detection", name
        feed = {ort_b.inputs[0].name: np.ascontiguousarray(x)}
        want, got = ort_b.execute(feed), ov_b.execute(feed)
        if meta.task.value == "detection":
            _detections_match(got, want, name)
        else:
            for k in want:
                _close(got[k], want[k], FP32_RTOL, f"{name}.{k} FP32")
        # the served variant (re-selected as the server does where this CPU's flags differ from the
        # build's): the server's backend vs the same runtime and precision in this process
        variant_choice.apply(cfg, meta, name)
        served = d / "1" / (cfg.default_model_filename or "model.onnx")
        extra = tuple((k, v.string_value) for k, v in cfg.parameters.items() if k == "INFERENCE_PRECISION_HINT")
        backend_cls = OpenVinoBackend if cfg.backend == "openvino" else OrtBackend
        backend = backend_cls(served, BackendOptions(intra_op_threads=2, max_batch_size=32, extra=extra))
        got, want = backend.execute(feed), served_runner(d)(feed[ort_b.inputs[0].name])
        precision = cfg.parameters["precision"].string_value.lower() or "fp32"
        for k in want:
            if meta.task.value == "detection":
                _detections_match(got, want, f"{name} served")
                break
            _close(got[k], want[k], FP32_RTOL if precision == "fp32" else INT8_RTOL, f"{name}.{k} {precision}")


def _request_in_turn(backend: OpenVinoBackend) -> Any:  # an openvino InferRequest
    """The infer request the next lone execution takes (the backend's requests are last in, first out)."""
    return backend._requests.queue[-1]


def test_inputs_and_outputs_are_shared_with_openvino_not_copied(tmp_path: Path) -> None:
    """A lone request's inputs arrive as read-only views over the message bytes: the infer request reads
    that memory itself (OpenVINO's own share_inputs would copy a read-only array); each output is
    computed into the array the backend returns, and a later execution never writes into it."""
    p = tmp_path / "affine.onnx"
    p.write_bytes(affine_model())
    ov_b = OpenVinoBackend(p, BackendOptions(intra_op_threads=1, max_batch_size=8))
    rng = np.random.default_rng(2)

    def message_views(n: int) -> dict[str, np.ndarray]:
        a = rng.standard_normal((n, 4)).astype(np.float32)
        b = rng.integers(-9, 9, (n, 2))
        return {
            "a": np.frombuffer(a.tobytes(), np.float32).reshape(n, 4),
            "b": np.frombuffer(b.tobytes()).view(b.dtype).reshape(n, 2),
        }

    first_in = message_views(3)
    assert not first_in["a"].flags.writeable
    request = _request_in_turn(ov_b)
    first = ov_b.execute(first_in)
    for name, port in ov_b._input_ports.items():
        assert request.get_tensor(port[0]).data.ctypes.data == first_in[name].ctypes.data, f"input {name} copied"
    for spec, port in ov_b._output_ports:
        assert request.get_tensor(port).data.ctypes.data == first[spec.name].ctypes.data, f"output {spec.name} copied"
    kept = {k: v.copy() for k, v in first.items()}
    assert _request_in_turn(ov_b) is request  # the same request runs the next batch
    second_in = message_views(5)
    second = ov_b.execute(second_in)
    for k in kept:  # the first answer stays as computed
        np.testing.assert_array_equal(first[k], kept[k])
    np.testing.assert_allclose(first["y"], first_in["a"] * 2 + 1, rtol=1e-6)
    np.testing.assert_array_equal(second["z"], second_in["b"] + 3)


def test_the_server_and_an_in_process_build_compile_with_the_same_settings(tmp_path: Path, server_factory) -> None:
    """What bench_served_ratio relies on: the server's instance and the one the benchmark builds with the
    server's loader (build_model, same threads) resolve to the same OpenVINO properties and infer
    requests; a config parameter (ENABLE_CPU_PINNING) reaches both; and the served answers are right."""
    import json

    import tritonclient.grpc as tc

    from cnncore.runtime import compiled_properties
    from server.repository import RuntimeDefaults, build_model

    config = (
        'backend: "openvino"\nmax_batch_size: 8\ndynamic_batching { }\n'
        'parameters { key: "ENABLE_CPU_PINNING" value { string_value: "YES" } }\n'
    )
    write_model(tmp_path / "repo", "affine", affine_model(), config)
    srv = server_factory(tmp_path / "repo", "--log-level", "info")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    client = tc.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    inputs = [tc.InferInput("a", [2, 4], "FP32"), tc.InferInput("b", [2, 2], "INT64")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(np.ones((2, 2), np.int64))
    res = client.infer("affine", inputs)
    np.testing.assert_allclose(res.as_numpy("y"), x * 2 + 1)
    np.testing.assert_array_equal(res.as_numpy("z"), np.full((2, 2), 4))
    logged = [
        json.loads(line)
        for line in srv.log_path.read_text().splitlines()
        if line.startswith("{") and '"openvino model compiled"' in line
    ]
    assert len(logged) == 1, srv.log_path.read_text()[-2000:]
    built = build_model(tmp_path / "repo" / "affine", RuntimeDefaults(intra_op_threads=1))
    here = built[0].instances[0]
    try:
        assert isinstance(here, OpenVinoBackend)
        assert logged[0]["properties"] == here.properties == compiled_properties(here.compiled)
        assert logged[0]["infer_requests"] == here.concurrent_executions
        assert here.properties["ENABLE_CPU_PINNING"] == "True"  # the config's, over the server's default
        assert here.properties["INFERENCE_NUM_THREADS"] == "1"
    finally:
        here.close()
