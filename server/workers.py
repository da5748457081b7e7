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
  serving (and rewritten with the new pid when a worker is replaced);
- the workers' lives, as gunicorn's arbiter keeps them: a worker that exits while the server runs is
  logged, counted (cnnserve_worker_restarts_total on the merged metrics endpoint) and started again
  after a backoff (0.1 s doubling per recent death of that worker, at most 10 s), while the others keep
  answering: the kernel only hands new connections to listening sockets, so a dead worker's share goes
  to the living ones, and only the connections it held fail. A crash loop (--worker-crash-limit deaths
  within --worker-crash-window-secs) stops the whole server with one error and exit status 1, and so
  does a worker that exits before it ever served (a configuration that cannot start is not retried);
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
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from server.metrics import OPENMETRICS_TYPE, merge_pages, serve_metrics
from server.shared_memory import REGISTRY_DIR_ENV

log = logging.getLogger("cnnserve.workers")

_WORKER_ENV = "CNNSERVE_WORKER"  # "index/count" in a worker's environment
DEFAULT_CRASH_LIMIT = 5  # deaths ...
DEFAULT_CRASH_WINDOW_S = 60.0  # ... within this many seconds stop the server
RESTART_BACKOFF_S = (0.1, 10.0)  # first delay, longest delay


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
    share = cpus[role.index :: role.count]
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
        self.urls = list(urls)  # one per worker slot; replaced when a worker is

    def collect(self) -> Iterable[Metric]:
        pages = []
        for url in list(self.urls):
            if not url:  # a slot whose worker has not served yet
                continue
            try:  # OpenMetrics: the format whose parser keeps counters' types and summaries whole
                request = urllib.request.Request(url, headers={"Accept": OPENMETRICS_TYPE})
                pages.append(urllib.request.urlopen(request, timeout=10).read().decode())
            except OSError as exc:  # a worker that is stopping: its share is missing from this scrape
                log.warning("worker metrics unavailable", extra={"url": url, "error": str(exc)})
        return merge_pages(pages)


def _child_argv(argv: Sequence[str], *, grpc_port: int, http_port: int | None, ready_file: Path) -> list[str]:
    # argparse keeps the last of repeated single-valued flags, so overrides are appended.
    out = [
        *argv,
        "--workers",
        "1",
        "--grpc-port",
        str(grpc_port),
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--ready-file",
        str(ready_file),
    ]
    if http_port is not None:
        out += ["--http-port", str(http_port)]
    return out


@dataclass
class _Slot:
    """One worker's place: the process now in it and what it reported when ready."""

    index: int
    proc: subprocess.Popen | None = None
    info: dict | None = None
    restart_at: float = 0.0  # while proc is None: when to start the next one
    deaths: deque = field(default_factory=deque)  # monotonic times of its recent deaths, for the backoff


class _CrashLoop(Exception):
    pass


def supervise(
    argv: Sequence[str],
    *,
    workers: int,
    grpc_address: str,
    grpc_port: int,
    http_address: str | None,
    http_port: int,
    metrics_address: str,
    metrics_port: int,
    allow_metrics: bool,
    ready_file: Path | None,
    exit_timeout_s: float,
    crash_limit: int = DEFAULT_CRASH_LIMIT,
    crash_window_s: float = DEFAULT_CRASH_WINDOW_S,
) -> int:
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
    # The supervisor's own families live in the merged endpoint's registry (it is not a multiprocess
    # writer: PROMETHEUS_MULTIPROC_DIR is set for the workers only).
    registry = CollectorRegistry()
    restarts = Counter(
        "cnnserve_worker_restarts", "Worker processes started again after one exited", ["worker"], registry=registry
    )
    serving = Gauge("cnnserve_workers_ready", "Worker processes serving now", registry=registry)
    for i in range(workers):
        restarts.labels(str(i))  # every worker's series from 0, so the first restart is an increase
    scraped = WorkerMetrics([""] * workers)
    slots = [_Slot(i) for i in range(workers)]
    deaths: deque[float] = deque()  # every worker's deaths within the crash window
    metrics_http = None
    published = False
    status = 0

    def spawn(slot: _Slot) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            _WORKER_ENV: f"{slot.index}/{workers}",
            REGISTRY_DIR_ENV: str(run_dir / "shared_memory"),
        }
        ready = run_dir / f"worker-{slot.index}.json"
        ready.unlink(missing_ok=True)
        args = _child_argv(argv, grpc_port=grpc_port, http_port=http_port if http_address else None, ready_file=ready)
        slot.proc, slot.info = subprocess.Popen([sys.executable, "-m", "server", *args], env=env), None
        return slot.proc

    def bury(slot: _Slot, now: float) -> None:
        """A worker exited while the server runs: count it, and plan its successor or stop."""
        proc = slot.proc
        assert proc is not None
        code = proc.returncode
        mark_process_dead(proc.pid, str(metrics_dir))  # its live gauges leave the merged view
        was_serving = slot.info is not None
        slot.proc, slot.info = None, None
        how = f"signal {-code}" if code < 0 else f"status {code}"
        if not published and not was_serving:
            log.error(
                "a worker exited before it served; stopping the others",
                extra={"worker": slot.index, "pid": proc.pid, "exit": how},
            )
            raise _CrashLoop
        deaths.append(now)
        while deaths and deaths[0] < now - crash_window_s:
            deaths.popleft()
        if len(deaths) >= crash_limit:
            log.error(
                f"workers are crash-looping: {len(deaths)} exits within {crash_window_s:g} s "
                f"(--worker-crash-limit {crash_limit}, --worker-crash-window-secs {crash_window_s:g}); "
                "stopping the server",
                extra={"worker": slot.index, "pid": proc.pid, "exit": how},
            )
            raise _CrashLoop
        slot.deaths.append(now)
        while slot.deaths and slot.deaths[0] < now - crash_window_s:
            slot.deaths.popleft()
        first, longest = RESTART_BACKOFF_S
        delay = min(longest, first * 2 ** (len(slot.deaths) - 1))
        slot.restart_at = now + delay
        log.warning(
            "a worker exited; restarting it",
            extra={"worker": slot.index, "pid": proc.pid, "exit": how, "restart_in_s": delay},
        )

    def publish() -> None:
        ready = {
            "grpc_port": grpc_port,
            "metrics_port": metrics_http.server_port if metrics_http else 0,
            "pid": os.getpid(),
            "models": slots[0].info["models"] if slots[0].info else {},
            "workers": [
                {"pid": s.proc.pid, "metrics_port": s.info["metrics_port"]}
                for s in slots
                if s.proc is not None and s.info is not None
            ],
        }
        if http_address is not None:
            ready["http_port"] = http_port
        log.info("server ready", extra=ready)
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(ready))
            tmp.replace(ready_file)

    try:
        for slot in slots:
            spawn(slot)
        log.info(
            "workers started",
            extra={"workers": workers, "pids": [s.proc.pid for s in slots if s.proc], "grpc_port": grpc_port},
        )
        while not requested:
            now = time.monotonic()
            changed = False
            for slot in slots:
                if slot.proc is not None and slot.proc.poll() is not None:
                    bury(slot, now)
                    changed = True
                if slot.proc is None and now >= slot.restart_at:
                    proc = spawn(slot)
                    restarts.labels(str(slot.index)).inc()
                    log.info("worker restarted", extra={"worker": slot.index, "pid": proc.pid})
                f = run_dir / f"worker-{slot.index}.json"
                if slot.proc is not None and slot.info is None and f.exists():
                    slot.info = json.loads(f.read_text())
                    scraped.urls[slot.index] = f"http://127.0.0.1:{slot.info['metrics_port']}/metrics"
                    changed = True
            serving.set(sum(s.info is not None for s in slots))
            if not published and all(s.info is not None for s in slots):
                if allow_metrics:
                    MultiProcessCollector(registry, path=str(metrics_dir))
                    registry.register(scraped)
                    metrics_http = serve_metrics(metrics_port, metrics_address, registry)
                published = True
                publish()
            elif published and changed and all(s.info is not None for s in slots):
                publish()  # a replaced worker serves: its pid and metrics port
            # Ready files and backoffs have no change notification; SIGCHLD/SIGTERM cut the wait short.
            waiting = published and all(s.info is not None for s in slots)
            stop.wait(1.0 if waiting else 0.05)
            stop.clear()
    except _CrashLoop:
        status = 1
    finally:
        procs = [s.proc for s in slots if s.proc is not None]
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
