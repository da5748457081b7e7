"""The README's walkthrough, run the way a newcomer follows it: every shell line and the Python snippet of
its "Walkthrough" section, as written, against a real server, with only the ports changed.

The default repository takes minutes to build (and downloads weights), so the two lines that build it
(`export onnx mobilenet_v2`, `export repository`) run only with CNNSERVE_README_FULL=1; otherwise a small
repository holding models with the README's names, inputs and outputs stands in for theirs, and every
other line runs unchanged: the example pictures, the registry commands, the server, tritonclient, curl
and the client CLI.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("torch", reason="the walkthrough's export commands need the export half")
pytest.importorskip("skimage", reason="scripts/make_examples.py needs scikit-image (export half)")

README = ROOT / "README.md"
HEAVY = re.compile(r"-m export (onnx|repository)\b")
FULL = os.environ.get("CNNSERVE_README_FULL") == "1"


def walkthrough_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block in the README's Walkthrough section."""
    section = text.split("## Walkthrough", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def shell_lines(code: str) -> list[str]:
    """Commands of a bash block: continuations joined, comments and blank lines dropped."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _small_repository(repo: Path) -> None:
    """The README's models by name, inputs and outputs, tiny and known (tests/vision_synthetic.py)."""
    from onnx import helper

    from cnncore.config import load_config, write_config
    from cnncore.spec import ModelMeta, PreprocessSpec, Task
    from vision_synthetic import _FLOAT, _write_model, build_synthetic_repository

    synthetic = build_synthetic_repository(repo.parent / "synthetic")
    for readme_name, ours in (
        ("shapes_detector", "box_detector"),
        ("shapes_segmenter_bilinear", "bright_segmenter"),
        ("fashion_mnist_autoencoder", "grey_autoencoder"),
    ):
        shutil.copytree(synthetic / ours, repo / readme_name)
        cfg = load_config(repo / readme_name)
        cfg.name = readme_name
        write_config(cfg, repo / readme_name)
        ModelMeta.read(repo / readme_name).model_copy(update={"name": readme_name}).write(repo / readme_name)
    _write_model(  # mobilenet_v2's input and output names and image size; logits = 10 x channel means
        repo,
        "mobilenet_v2",
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        [("input", [3, 224, 224])],
        [("logits", _FLOAT, [3])],
        ModelMeta(
            name="mobilenet_v2",
            task=Task.classification,
            preprocess=PreprocessSpec(input_size=(224, 224)),
            labels=["red", "green", "blue"],
        ),
        [("w", np.eye(3, dtype=np.float32) * 10)],
    )


def _ported(line: str, grpc: int, http: int, metrics: int) -> str:
    line = line.replace("localhost:8000", f"localhost:{http}").replace("localhost:8001", f"localhost:{grpc}")
    line = line.replace("localhost:8002", f"localhost:{metrics}")
    if "-m client" in line and "--url" not in line:
        line = line.replace("-m client", f"-m client --url 127.0.0.1:{grpc}", 1)
    if "-m server" in line:
        line += f" --grpc-port {grpc} --http-port {http} --metrics-port {metrics}"
    return line


def _wait_ready(http: int, server: subprocess.Popen, log: Path) -> None:
    t_end = time.monotonic() + 300
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5).status == 200:
                return
        except OSError:
            pass
        if server.poll() is not None:
            raise AssertionError(f"the README's server command exited {server.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > t_end:
            raise AssertionError(f"the README's server never became ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = walkthrough_blocks(README.read_text())
    assert [lang for lang, _ in blocks].count("bash") >= 3 and any(lang == "python" for lang, _ in blocks)
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    (work / "scripts").symlink_to(ROOT / "scripts")  # the clone's scripts: the walkthrough runs one
    if not FULL:
        _small_repository(work / "model_repository")
    grpc, http, metrics = _free_ports(3)
    server: subprocess.Popen | None = None
    log = tmp_path / "server.log"
    ran: list[str] = []
    try:
        for lang, code in blocks:
            if lang == "python":
                res = subprocess.run(
                    [sys.executable, "-c", _ported(code, grpc, http, metrics)],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert res.returncode == 0, f"README python block failed:\n{code}\n{res.stderr[-3000:]}"
                ran.append("python block")
                continue
            for line in shell_lines(code):
                if HEAVY.search(line) and not FULL:
                    continue
                command = _ported(line, grpc, http, metrics)
                if "-m server" in line:
                    with open(log, "w") as out:
                        server = subprocess.Popen(
                            ["bash", "-c", f"exec {command}"], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT
                        )
                    _wait_ready(http, server, log)
                    ran.append(line)
                    continue
                res = subprocess.run(
                    ["bash", "-c", command],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=1800 if FULL else 300,
                )
                assert res.returncode == 0, f"README line failed: {line}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
                if line.startswith("curl"):  # curl -s exits 0 on an HTTP error too: its body says
                    assert '"error"' not in res.stdout, f"README line answered an error: {line}\n{res.stdout[:2000]}"
                ran.append(line)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(60)
    assert server is not None, "the walkthrough starts no server"
    assert any("-m client classify" in r for r in ran) and any(r.startswith("curl") for r in ran)
    assert (work / "examples" / "chelsea.jpg").exists()  # the pictures the walkthrough makes, then uses
    assert (work / "boxes.png").exists() and (work / "recon.png").exists()  # what the client lines write
