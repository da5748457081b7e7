"""The serving half stands alone: a fresh virtual environment with only pyproject's serving dependencies
(no torch, no onnx, no models/ or export/) starts the server on a repository and answers a request.

This is what deploy/server.Dockerfile builds; the import-linter contracts say the same of the code, this
test proves it of the installed result. The venv installs from pip's cache where setup.sh has filled it.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from conftest import ROOT, affine_model, start_server, write_model

SERVING_PACKAGES = ("server", "cnncore", "protos")


@pytest.fixture(scope="module")
def serving_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    base = tmp_path_factory.mktemp("serving_only")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["cpu"]  # ONNX Runtime: the `cpu` extra
    res = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *deps],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, f"installing the serving dependencies failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    src = base / "src"
    for pkg in SERVING_PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return python, src


def test_serving_environment_has_no_torch(serving_env: tuple[str, Path]) -> None:
    python, src = serving_env
    for module in ("torch", "onnx", "models", "export"):
        res = subprocess.run([python, "-c", f"import {module}"], cwd=src, capture_output=True, text=True)
        assert res.returncode != 0, f"{module} is importable in the serving-only environment"
        assert "ModuleNotFoundError" in res.stderr


def test_openvino_installs_and_runs_in_the_serving_environment(serving_env: tuple[str, Path]) -> None:
    python, src = serving_env
    code = (
        "import sys, openvino; assert 'CPU' in openvino.Core().available_devices; "
        "import server.backends; assert 'openvino' in server.backends.base.available_backends(); "
        "assert 'torch' not in sys.modules"
    )
    res = subprocess.run([python, "-c", code], cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_serving_only_environment_serves(serving_env: tuple[str, Path], tmp_path: Path) -> None:
    python, src = serving_env
    repo = tmp_path / "repo"
    write_model(repo, "affine", affine_model(), "max_batch_size: 8\ndynamic_batching { }\n")
    srv = start_server(repo, tmp_path, python=python, source_root=src)
    try:
        client = tc.InferenceServerClient(srv.grpc_url)
        assert client.is_model_ready("affine")
        a = np.arange(8, dtype=np.float32).reshape(2, 4)
        b = np.array([[1, 2], [3, 4]], dtype=np.int64)
        inputs = [tc.InferInput("a", list(a.shape), "FP32"), tc.InferInput("b", list(b.shape), "INT64")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("affine", inputs)
        np.testing.assert_array_equal(result.as_numpy("y"), a * 2 + 1)
        np.testing.assert_array_equal(result.as_numpy("z"), b + 3)
    finally:
        assert srv.terminate() == 0, srv.log()[-3000:]
