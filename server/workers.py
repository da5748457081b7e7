"""`--workers N`: N server processes behind one port, one supervisor in front of them.

One Python process receives, decodes and answers every request on one core's worth of interpreter;
N processes bound to the same port with SO_REUSEPORT (gRPC's `grpc.so_reuseport`, the way gRPC's
Python examples scale over cores) let the kernel spread connections over N event loops. Each worker
is a complete server (`python -m server` with the same flags) loading the whole repository, with its
share of the cores: pinned to a disjoint CPU set when there are enough CPUs, and ONNX Runtime's
intra-op threads sized to that share unless --intra-op-threads says otherwise. Instance counts are
per worker, as configured.

The supervisor (this module, the process started by the user) owns what must be one thing:
- the ports: it binds them first with SO_REUSEPORT (so port 0 resolves to one port for all workers)
  and holds them without listening, so no other program can take them between worker restarts;
- readiness: its --ready-file is written only once every worker wrote its own, i.e. every worker is
  serving; a worker that exits unexpectedly stops the others and the supervisor (exit status 1), so
  an orchestrator sees one failed server, never a half-served port;
- metrics: one endpoint for the whole server. The histograms and counters the workers create are in
  prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a fresh directory per run) and
  merged by its MultiProcessCollector; Triton's nv_inference_* counters are read at scrape time from
  each worker's live statistics (a custom collector, which multiprocess mode cannot carry), fetched
  from each worker's loopback metrics endpoint and summed per label set;
- shutdown: SIGTERM/SIGINT are forwarded to every worker, each drains its accepted requests as a
  single server does, and the supervisor exits when all have (0 when all exited cleanly).

System shared-memory registrations are shared by the workers through a directory of the run
(server/shared_memory.py): a region registered over one connection can be named over any other.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from server.metrics import OPENMETRICS_TYPE, merge_pages, serve_metrics
from server.shared_memory import REGISTRY_DIR_ENV

log = logging.getLogger("cnnserve.workers")

_WORKER_ENV = "CNNSERVE_WORKER"  # "index/count" in a worker's environment


@dataclass(frozen=True)
class WorkerRole:
    index: int
    count: int


def worker_role() -> WorkerRole | None:
    """This process's place among the workers, or None when it is not a supervised worker."""
    value = os.environ.get(_WORKER_ENV)
    if not value:
        return None
    index, count = (int(x) for x in value.split("/"))
    return WorkerRole(index, count)


def take_cpu_share(role: WorkerRole) -> int:
    """Pin this worker to its disjoint share of the CPUs it may use; returns the share's size.

    With fewer CPUs than workers nothing is pinned (workers share all CPUs) and the share is 1."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < role.count:
        return 1
    share = cpus[role.index::role.count]
    os.sched_setaffinity(0, share)
    return len(share)


def reserve_port(address: str, port: int) -> socket.socket:
    """A socket bound (not listening) to address:port with SO_REUSEPORT: fixes the port number for the
    workers, which bind it the same way, and keeps it ours while they run."""
    host = address.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"could not bind {address}:{port}: {exc.strerror or exc}") from None
    return sock


class WorkerMetrics(Collector):
    """Triton's scrape-time families (metrics.TRITON_FAMILIES: computed from each worker's live
    statistics, which multiprocess files cannot carry) merged over the workers' own endpoints."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def collect(self) -> Iterable[Metric]:
        pages = []
        for url in self.urls:
            try:  # OpenMetrics: the format whose parser keeps counters' types and summaries whole
                request = urllib.request.Request(url, headers={"Accept": OPENMETRICS_TYPE})
                pages.append(urllib.request.urlopen(request, timeout=10).read().decode())
            except OSError as exc:  # a worker that is stopping: its share is missing from this scrape
                log.warning("worker metrics unavailable", extra={"url": url, "error": str(exc)})
        return merge_pages(pages)


def _child_argv(argv: Sequence[str], *, grpc_port: int, http_port: int | None, ready_file: Path) -> list[str]:
    # argparse keeps the last of repeated single-valued flags, so overrides are appended.
    out = [*argv, "--workers", "1", "--grpc-port", str(grpc_port), "--metrics-address", "127.0.0.1",
           "--metrics-port", "0", "--ready-file", str(ready_file)]
    if http_port is not None:
        out += ["--http-port", str(http_port)]
    return out


def supervise(argv: Sequence[str], *, workers: int, grpc_address: str, grpc_port: int,
              http_address: str | None, http_port: int, metrics_address: str, metrics_port: int,
              allow_metrics: bool, ready_file: Path | None, exit_timeout_s: float) -> int:
    """Run `workers` copies of `python -m server argv` on shared ports until a signal; the exit status."""
    stop = threading.Event()
    requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if signum != signal.SIGCHLD:
            requested.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, on_signal)

    held = [reserve_port(grpc_address, grpc_port)]
    grpc_port = held[0].getsockname()[1]
    if http_address is not None:
        held.append(reserve_port(http_address, http_port))
        http_port = held[1].getsockname()[1]
    run_dir = Path(tempfile.mkdtemp(prefix="cnnserve-workers-"))
    metrics_dir = run_dir / "prometheus"
    metrics_dir.mkdir()
    procs: list[subprocess.Popen] = []
    metrics_http = None
    status = 0
    try:
        for i in range(workers):
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), _WORKER_ENV: f"{i}/{workers}",
                   REGISTRY_DIR_ENV: str(run_dir / "shared_memory")}
            args = _child_argv(argv, grpc_port=grpc_port, http_port=http_port if http_address else None,
                               ready_file=run_dir / f"worker-{i}.json")
            procs.append(subprocess.Popen([sys.executable, "-m", "server", *args], env=env))
        log.info("workers started", extra={"workers": workers, "pids": [p.pid for p in procs],
                                           "grpc_port": grpc_port})
        infos: list[dict | None] = [None] * workers
        while not requested:
            if any(p.poll() is not None for p in procs):
                raise _WorkerDied(procs)
            for i in range(workers):
                f = run_dir / f"worker-{i}.json"
                if infos[i] is None and f.exists():
                    infos[i] = json.loads(f.read_text())
            if all(infos):
                break
            stop.wait(0.05)  # ready files have no change notification; SIGCHLD/SIGTERM cut this short
            stop.clear()
        if not requested:
            metrics_port_bound = 0
            if allow_metrics:
                registry = CollectorRegistry()
                MultiProcessCollector(registry, path=str(metrics_dir))
                registry.register(WorkerMetrics(
                    [f"http://127.0.0.1:{info['metrics_port']}/metrics" for info in infos if info]))
                metrics_http = serve_metrics(metrics_port, metrics_address, registry)
                metrics_port_bound = metrics_http.server_port
            ready = {"grpc_port": grpc_port, "metrics_port": metrics_port_bound, "pid": os.getpid(),
                     "models": infos[0]["models"] if infos[0] else {},
                     "workers": [{"pid": p.pid, "metrics_port": info["metrics_port"]}
                                 for p, info in zip(procs, infos) if info]}
            if http_address is not None:
                ready["http_port"] = http_port
            log.info("server ready", extra=ready)
            if ready_file is not None:
                tmp = ready_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(ready))
                tmp.replace(ready_file)
        while not requested:
            stop.wait(1.0)
            stop.clear()
            if not requested and any(p.poll() is not None for p in procs):
                raise _WorkerDied(procs)
    except _WorkerDied as died:
        log.error("a worker exited; stopping the others", extra={"exited": died.exited})
        status = 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + exit_timeout_s + 10.0
        for p in procs:
            try:
                code = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                code = p.wait()
            status = status or (1 if code else 0)
        if metrics_http is not None:
            metrics_http.shutdown()
        for s in held:
            s.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("server stopped", extra={"status": status})
    return status


class _WorkerDied(Exception):
    def __init__(self, procs: Sequence[subprocess.Popen]) -> None:
        self.exited = {p.pid: p.returncode for p in procs if p.returncode is not None}
        super().__init__(str(self.exited))
