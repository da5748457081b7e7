"""Start-up as an operator sees it: one line and a non-zero exit for what stops the server, ports bound
before any model loads, Triton's readiness default and its --allow-* switches."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as tc

from conftest import AFFINE_CONFIG, ROOT, ServerProcess, affine_model, write_model

NOISE = (
    "Traceback",
    "Task exception was never retrieved",
    "Event loop is closed",
    "never awaited",
    "Exception ignored",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("startup")
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    return repo


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-address",
            "127.0.0.1",
            "--http-port",
            "0",
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            "0",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line(res: subprocess.CompletedProcess) -> str:
    """The failure's stderr, checked to be one clear line and nothing else."""
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert not any(n in res.stderr for n in NOISE), res.stderr
    assert lines[0].startswith("python -m server: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port", "--metrics-port"])
def test_port_in_use_is_one_line_before_any_model_loads(repo: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _run("--model-repository", str(repo), flag, str(port))
    line = _one_line(res)
    assert f"127.0.0.1:{port}" in line and flag in line and "in use" in line, line
    assert "model loaded" not in res.stdout + res.stderr  # the bind failed first: nothing was loaded


def test_missing_repository_is_one_line(tmp_path: Path) -> None:
    line = _one_line(_run("--model-repository", str(tmp_path / "nowhere")))
    assert "--model-repository" in line and "not a directory" in line


def _http_status(srv: ServerProcess, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_strict_readiness_is_the_default(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    write_model(repo, "broken", b"not an onnx file", "max_batch_size: 4\n")
    srv = server_factory(repo, "--model-control-mode", "explicit", "--load-model", "*")
    client = tc.InferenceServerClient(srv.grpc_url)
    assert client.is_server_live() and client.is_model_ready("affine")
    assert not client.is_server_ready()  # a model failed to load: not ready, as Triton by default
    assert _http_status(srv, "/v2/health/ready") == 400
    client.unload_model("broken")  # unloaded on purpose does not count against readiness (Triton's rule)
    assert client.is_server_ready() and _http_status(srv, "/v2/health/ready") == 200

    lenient = server_factory(repo, "--strict-readiness", "false")
    assert tc.InferenceServerClient(lenient.grpc_url).is_server_ready()


def test_allow_flags_switch_listeners_off(repo: Path, server_factory) -> None:
    http_only = server_factory(repo, "--allow-grpc", "false", "--allow-metrics", "false")
    assert http_only.ready["grpc_port"] == 0 and http_only.ready["metrics_port"] == 0
    assert _http_status(http_only, "/v2/health/ready") == 200

    grpc_only = server_factory(repo, "--allow-http", "false")
    assert grpc_only.ready["http_port"] == 0 and grpc_only.ready["metrics_port"] != 0
    assert tc.InferenceServerClient(grpc_only.grpc_url).is_server_ready()

    line = _one_line(_run("--model-repository", str(repo), "--allow-grpc", "false", "--allow-http", "false"))
    assert "nothing to serve" in line


def test_grpc_off_leaves_its_port_free(repo: Path, server_factory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = server_factory(repo, "--allow-grpc", "false", "--grpc-port", str(port))
    assert _http_status(srv, "/v2/health/live") == 200
    with socket.socket() as again:  # nothing listens there: this bind would fail otherwise
        again.bind(("127.0.0.1", port))
