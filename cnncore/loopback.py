"""The real server as a child process on loopback, for measurements that must see it whole (export's
RSS per model, the benchmarks): `python -m server` on 127.0.0.1 with ephemeral gRPC and metrics ports
and no REST listener, ready once its ready file names every model READY.

    server = loopback.start(repo, work, models=["mobilenet_v2"])   # None: every model, []: none
    try:
        print(server.ready_s, server.info["grpc_port"], server.rss_mib())
    finally:
        server.stop()

A child process rather than the server in this process: export never imports the serving half, and
what a measurement reads (VmRSS, time to ready) must be the server's alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class ServerNotReady(RuntimeError):
    """The server exited, timed out or did not load every model: the one-line reason."""


def vmrss_mib(pid: int) -> float:
    """Resident memory of process `pid` from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ServerNotReady(f"no VmRSS for process {pid}")


@dataclass
class LoopbackServer:
    proc: subprocess.Popen[bytes]
    ready_s: float  # process start to ready
    info: dict[str, Any]  # the ready file: ports and model states

    def rss_mib(self) -> float:
        return vmrss_mib(self.proc.pid)

    def stop(self, wait_s: float = 60.0) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(wait_s)


def start(
    repo: Path,
    work: Path,
    models: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 300.0,
) -> LoopbackServer:
    """Start the server on `repo` (`models`: only those, in explicit control mode; None: all) with its
    log and ready file in `work`; returns once ready. ServerNotReady (the process stopped) otherwise."""
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
        *(
            ["--model-control-mode", "explicit", *[a for m in models for a in ("--load-model", m)]]
            if models is not None
            else []
        ),
        *extra_args,
    ]
    t0 = time.monotonic()
    with open(log, "w") as logf:  # the server writes to its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=logf, stderr=subprocess.STDOUT
        )
    server = LoopbackServer(proc, 0.0, {})
    try:
        while not ready.exists():
            if proc.poll() is not None:
                tail = log.read_text().strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                raise ServerNotReady(f"the server exited before it was ready: {tail[0][:300]}")
            if time.monotonic() - t0 > timeout_s:
                raise ServerNotReady(f"the server was not ready within {timeout_s:.0f} s")
            time.sleep(0.005)
        server.ready_s = time.monotonic() - t0
        server.info = json.loads(ready.read_text())
        states = server.info.get("models", {})
        if any(state != "READY" for state in states.values()) or any(states.get(m) != "READY" for m in models or ()):
            raise ServerNotReady(f"not every model loaded: {states}")
    except BaseException:
        server.stop()
        raise
    return server
