"""What one repository model costs the server in resident memory, measured, never estimated.

`served_rss` starts the real server (`python -m server`, a separate process: export never imports the
serving half) twice on the repository: once with no model loaded (`--model-control-mode explicit`) and
once with only the model; each time it reads the process's VmRSS from /proc once the ready file says
every model is READY, i.e. after the config's warm-up ran. The model's share is the difference. What it
does not include: the memory a model grows under load beyond its warm-up (benchmarks/bench_cold_start.py
--soak measures that), and the other models' (each is measured alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class RssUnavailable(RuntimeError):
    """The server could not be started, or the model did not load: the one-line reason."""


@dataclass(frozen=True)
class ServedRss:
    empty_mib: float  # the server with no model
    loaded_mib: float  # the server with only this model, loaded and warmed up
    ready_s: float  # process start to ready, with this model

    @property
    def model_mib(self) -> float:
        return self.loaded_mib - self.empty_mib


def vmrss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RssUnavailable(f"no VmRSS for process {pid}")


def _server_rss(repo: Path, models: list[str], work: Path, timeout_s: float) -> tuple[float, float]:
    ready = work / "ready.json"
    log = work / "server.log"
    ready.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--model-repository",
        str(repo),
        "--grpc-address",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--allow-http",
        "false",
        "--ready-file",
        str(ready),
        "--model-control-mode",
        "explicit",
        *[a for m in models for a in ("--load-model", m)],
    ]
    t0 = time.monotonic()
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=logf, stderr=subprocess.STDOUT
        )
    try:
        while not ready.exists():
            if proc.poll() is not None:
                tail = log.read_text().strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                raise RssUnavailable(f"the server exited before it was ready: {tail[0][:300]}")
            if time.monotonic() - t0 > timeout_s:
                raise RssUnavailable(f"the server was not ready within {timeout_s:.0f} s")
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        states = json.loads(ready.read_text()).get("models", {})
        if any(states.get(m) != "READY" for m in models):
            raise RssUnavailable(f"not loaded: {states}")
        return vmrss_mib(proc.pid), elapsed
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def served_rss(repo: Path, name: str, timeout_s: float = 300.0) -> ServedRss:
    """VmRSS of the server on `repo` with `name` alone, and with no model (see the module docstring)."""
    if not Path(f"/proc/{os.getpid()}/status").is_file():
        raise RssUnavailable("no /proc here: VmRSS is read from /proc/<pid>/status")
    with tempfile.TemporaryDirectory(prefix="rss-") as tmp:
        empty, _ = _server_rss(Path(repo), [], Path(tmp), timeout_s)
        loaded, ready_s = _server_rss(Path(repo), [name], Path(tmp), timeout_s)
    return ServedRss(empty_mib=round(empty, 1), loaded_mib=round(loaded, 1), ready_s=round(ready_s, 2))
