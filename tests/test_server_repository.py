"""The repository loader in-process: version policies, model.json, per-model failures, reloads."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from cnncore.spec import ModelMeta, PreprocessSpec, Task
from conftest import ROOT, affine_model, write_model
from server.backends.base import BackendOptions, register_backend
from server.backends.ort_backend import OrtBackend
from server.errors import InferError
from server.repository import ModelRepository

pytestmark = pytest.mark.timeout(120)


def _load(repo: Path, *names: str) -> ModelRepository:
    async def main() -> ModelRepository:
        r = ModelRepository(repo)
        await r.load_all(names or None)
        return r

    return asyncio.run(main())


@pytest.mark.parametrize(
    "policy, served",
    [
        ("", [3]),
        ("version_policy { latest { num_versions: 2 } }", [2, 3]),
        ("version_policy { all { } }", [1, 2, 3]),
        ("version_policy { specific { versions: [1, 3] } }", [1, 3]),
    ],
)
def test_version_policies(tmp_path: Path, policy: str, served: list[int]) -> None:
    write_model(tmp_path, "m", affine_model(), f"max_batch_size: 4\n{policy}\n", versions=(1, 2, 3))
    repo = _load(tmp_path)
    assert sorted(repo.models["m"].versions) == served
    assert repo.get("m").version == max(served)
    with pytest.raises(InferError) as err:
        repo.get("m", "9")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_model_json_is_kept_for_the_vision_api(tmp_path: Path) -> None:
    d = write_model(tmp_path, "m", affine_model(), "max_batch_size: 4\n")
    ModelMeta(
        name="m",
        task=Task.classification,
        preprocess=PreprocessSpec(input_size=(2, 2)),
        labels=["a", "b", "c", "d"],
        input_name="a",
    ).write(d)
    repo = _load(tmp_path)
    meta = repo.get("m").meta
    assert meta is not None and meta.task == Task.classification and meta.labels == ["a", "b", "c", "d"]


def _unversion(model_dir: Path) -> None:
    (model_dir / "1" / "model.onnx").rename(model_dir / "model.onnx")
    (model_dir / "1").rmdir()


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda d: (d / "model.json").write_text(json.dumps({"name": "m"})), "model.json: invalid model metadata"),
        (lambda d: (d / "config.pbtxt").write_text('name: "other"\nmax_batch_size: 4\n'), "differs from directory"),
        (lambda d: (d / "1" / "model.onnx").unlink(), "1/model.onnx: model file not found"),
        (lambda d: _unversion(d), "no numbered version"),
        (
            lambda d: (d / "config.pbtxt").write_text(
                "max_batch_size: 4\nversion_policy { specific { versions: [2] } }"
            ),
            "version(s) [2], not on disk",
        ),
        (
            lambda d: (d / "config.pbtxt").write_text(
                'max_batch_size: 4\ninput [{ name: "a" data_type: TYPE_FP16 '
                'dims: [4] }, { name: "b" data_type: TYPE_INT64 dims: [2] }]'
            ),
            "input 'a': config says FP16, model has FP32",
        ),
        (
            lambda d: (d / "config.pbtxt").write_text(
                'max_batch_size: 4\ninput [{ name: "a" data_type: TYPE_FP32 '
                'dims: [5] }, { name: "b" data_type: TYPE_INT64 dims: [2] }]'
            ),
            "config dims [5] do not match the model's [4]",
        ),
        (lambda d: (d / "config.pbtxt").write_text('max_batch_size: 4\nbackend: "tensorflow"\n'), "unknown backend"),
        (
            lambda d: (d / "config.pbtxt").write_text(
                'max_batch_size: 4\nparameters { key: "intra_op_allow_spinning" value { string_value: "2" } }\n'
            ),
            "must be 0 or 1",
        ),
    ],
)
def test_a_broken_model_fails_alone_with_a_reason(tmp_path: Path, setup, fragment: str) -> None:
    write_model(tmp_path, "good", affine_model(), "max_batch_size: 4\n")
    d = write_model(tmp_path, "m", affine_model(), 'max_batch_size: 4\nbackend: "onnxruntime"\n')
    setup(d)
    repo = _load(tmp_path)
    assert repo.models["good"].state == "READY"
    assert repo.models["m"].state == "UNAVAILABLE"
    assert fragment in repo.models["m"].reason, repo.models["m"].reason
    with pytest.raises(InferError) as err:
        repo.get("m")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_failed_reload_keeps_the_previous_copy_serving(tmp_path: Path) -> None:
    d = write_model(tmp_path, "m", affine_model(), "max_batch_size: 4\n")

    async def main():
        repo = ModelRepository(tmp_path)
        await repo.load("m")
        (d / "config.pbtxt").write_text("max_batch_size: four\n")
        state = await repo.load("m")
        seen = (state.state, state.reason)
        a = np.ones((1, 4), np.float32)
        out = await repo.get("m").batcher.infer({"a": a, "b": np.zeros((1, 2), np.int64)})
        await repo.close()
        return seen, out

    (state, reason), out = asyncio.run(main())
    assert state == "READY" and "config.pbtxt:1" in reason
    np.testing.assert_array_equal(out["y"], np.full((1, 4), 3.0, np.float32))


def test_cli_help_and_bad_repository() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0
    for flag in (
        "--model-repository",
        "--grpc-port",
        "--metrics-port",
        "--intra-op-threads",
        "--log-level",
        "--exit-timeout-secs",
        "--model-control-mode",
    ):
        assert flag in res.stdout
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--model-repository",
            "/nonexistent/repo",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "/nonexistent/repo is not a directory" in res.stderr


class _MeetingBackend(OrtBackend):
    """Loads only once the other model using it is loading too: with the loads in sequence the barrier
    breaks (its timeout is a failure guard, not an ordering device) and both fail."""

    barrier: threading.Barrier

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        type(self).barrier.wait()
        super().__init__(model_file, options)


register_backend("test_meeting", _MeetingBackend)


def test_models_load_in_parallel_and_one_failing_stops_none(tmp_path: Path) -> None:
    _MeetingBackend.barrier = threading.Barrier(2, timeout=60)
    meeting = 'max_batch_size: 4\nbackend: "test_meeting"\ndefault_model_filename: "model.onnx"\n'
    write_model(tmp_path, "a_first", affine_model(), meeting)
    write_model(tmp_path, "b_broken", b"not an onnx file", "max_batch_size: 4\n")
    write_model(tmp_path, "c_second", affine_model(), meeting)
    repo = _load(tmp_path)
    assert repo.models["a_first"].state == "READY", repo.models["a_first"].reason
    assert repo.models["c_second"].state == "READY", repo.models["c_second"].reason
    assert repo.models["b_broken"].state == "UNAVAILABLE" and "b_broken" in repo.models["b_broken"].reason
