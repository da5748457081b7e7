"""The real default repository (what `python -m export repository` builds) served end to end.

Every default model answers through tritonclient exactly as in-process ONNX Runtime does on the same
file, and its config/metadata agree with the ONNX graph. The repository comes from
$CNNSERVE_MODEL_REPOSITORY when set, else conftest's `default_repository` builds it once per session
with the export CLI; without torch/the export half it is skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from conftest import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.precision, pytest.mark.timeout(1800)]

_NUMPY = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8, "INT64": np.int64, "INT32": np.int32}


@pytest.fixture(scope="module")
def default_repo(default_repository: Path) -> Path:
    return default_repository  # conftest: built once per session by `python -m export repository`


@pytest.fixture(scope="module")
def server(default_repo: Path, server_factory) -> ServerProcess:
    return server_factory(default_repo, "--strict-readiness", "true")


class _ServedSession:
    """The variant config.pbtxt serves (runtime, file, INFERENCE_PRECISION_HINT) run in this process, with
    onnxruntime.InferenceSession's run(): each model is compared with the runtime and precision that
    serve it, never with another (different runtimes and precisions differ by more than float order;
    the accuracy gate compares those through the task's metric)."""

    def __init__(self, model_dir: Path, version: str) -> None:
        from export.runtimes import served_runner

        self._run = served_runner(model_dir, int(version))

    def run(self, _names, feeds: dict) -> list:
        return list(self._run(next(iter(feeds.values()))).values())


def _model_names(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").exists())


def test_every_default_model_matches_onnxruntime(default_repo: Path, server: ServerProcess) -> None:
    names = _model_names(default_repo)
    assert names, f"no models in {default_repo}"
    client = tc.InferenceServerClient(server.grpc_url)
    assert client.is_server_ready()  # strict readiness: every model loaded
    rng = np.random.default_rng(0)
    for name in names:
        meta = client.get_model_metadata(name)
        cfg = client.get_model_config(name).config
        version = meta.versions[-1]
        sess = ort.InferenceSession(
            str(default_repo / name / version / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        assert [i.name for i in meta.inputs] == [i.name for i in sess.get_inputs()]
        assert [o.name for o in meta.outputs] == [o.name for o in sess.get_outputs()]
        if cfg.backend == "openvino":  # export chose OpenVINO: compare with it in this process
            sess = _ServedSession(default_repo / name, version)
        batch = 2 if cfg.max_batch_size >= 2 else 1
        feeds, inputs = {}, []
        for t in meta.inputs:
            shape = [batch if d == -1 and i == 0 and cfg.max_batch_size else d for i, d in enumerate(t.shape)]
            assert all(d > 0 for d in shape), f"{name}: variable input dims {list(t.shape)} not handled here"
            arr = rng.standard_normal(shape).astype(_NUMPY[t.datatype])
            feeds[t.name] = arr
            inp = tc.InferInput(t.name, shape, t.datatype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        result = client.infer(name, inputs)
        expected = sess.run(None, feeds)
        for o, want in zip(meta.outputs, expected, strict=True):
            got = result.as_numpy(o.name)
            assert got.shape == want.shape, f"{name}.{o.name}"
            # Same runtime, same graph; thread counts may reorder float sums, nothing more.
            scale = float(np.max(np.abs(want))) if want.size and want.dtype.kind == "f" else 1.0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0), err_msg=f"{name}.{o.name}")
