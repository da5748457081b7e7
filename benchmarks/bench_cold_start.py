"""Benchmark: cold start to ready (process start -> every model loaded, warmed up, ServerReady), same run
with and without the configs' model_warmup, in interleaved rounds.

    .venv/bin/python benchmarks/bench_cold_start.py --repository model_repository [--rounds 3]

The repository is what `python -m export repository` writes (its configs carry the warm-up). The
no-warm-up side serves a copy whose configs have model_warmup removed (model files hard-linked). Prints
each round, the medians, the warm-up's share, and each model's warm-up time from the server's log.
Target: at most 5 s to ready for the default repository with warm-up.

The server's resident memory (VmRSS) once ready is printed per round; `--per-model-rss` also starts an
empty server and one server per model (`--model-control-mode explicit --load-model M`) and prints what
each model adds to the empty server's RSS (target: the whole repository at most 500 MiB); `--soak 60`
then serves the whole repository under load (gRPC, concurrency 8, each model in turn: soak_load.py)
and prints its RSS once ready, after each model and at the end (the same target). The first
round may compile where the repository's OpenVINO cache (<repository>/.cache) is still empty; later
rounds import the cached blobs.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cnncore import loopback
from cnncore.config import CONFIG_FILENAME, load_config, render_config

ROOT = Path(__file__).resolve().parents[1]


def without_warmup(repo: Path, into: Path) -> Path:
    shutil.copytree(repo, into, copy_function=os.link)
    for cfg_path in into.glob(f"*/{CONFIG_FILENAME}"):
        cfg = load_config(cfg_path.parent)
        del cfg.model_warmup[:]
        cfg_path.unlink()  # a hard link to the original: never write through it
        cfg_path.write_text(render_config(cfg))
    return into


def start_server(repo: Path, work: Path, models: list[str] | None = None) -> loopback.LoopbackServer:
    """The server on `repo` (only `models`, when given), once ready, strict readiness; the caller stops it."""
    try:
        return loopback.start(repo, work, models=models, extra_args=("--strict-readiness", "true"))
    except loopback.ServerNotReady as exc:
        raise SystemExit(f"{exc}\n{(work / 'server.log').read_text()[-3000:]}") from None


def time_to_ready(repo: Path, work: Path, models: list[str] | None = None) -> tuple[float, dict[str, float], float]:
    server = start_server(repo, work, models)
    try:
        rss = server.rss_mib()
    finally:
        server.stop()
    warm = {}
    for line in (work / "server.log").read_text().splitlines():
        if line.startswith("{") and '"model warmed up"' in line:
            rec = json.loads(line)
            warm[rec["model"]] = rec["ms"]
    return server.ready_s, warm, rss


QUIET_S = 5.0


def soak(repo: Path, work: Path, seconds: float, concurrency: int) -> None:
    """The whole repository under load: gRPC clients at `concurrency` against each model in turn
    (benchmarks/soak_load.py, `seconds` split evenly), the server's VmRSS sampled throughout; prints it
    once ready, after each model's slice, its peak and at the end."""
    server = start_server(repo, work)
    elapsed, info = server.ready_s, server.info
    try:
        ready_rss = server.rss_mib()
        print(f"soak: ready in {elapsed:.2f} s, {ready_rss:.0f} MiB RSS; concurrency {concurrency}, {seconds:.0f} s")
        load = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "soak_load.py"),
                "--url",
                f"127.0.0.1:{info['grpc_port']}",
                "--seconds",
                str(seconds),
                "--concurrency",
                str(concurrency),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        peak = ready_rss
        lines: queue.Queue[str] = queue.Queue()
        assert load.stdout is not None
        out = load.stdout

        def read() -> None:
            for ln in out:
                lines.put(ln)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + seconds + 120  # bounded: the load's own slices plus its start
        while time.monotonic() < deadline and (load.poll() is None or reader.is_alive() or not lines.empty()):
            peak = max(peak, server.rss_mib())
            try:
                line = lines.get(timeout=0.25)
            except queue.Empty:
                continue
            _, model, done, errors = line.split()
            print(f"  after {model} ({done} requests, {errors} errors): {server.rss_mib():.0f} MiB", flush=True)
        if load.poll() is None:
            load.kill()
            raise SystemExit("soak: the load did not finish in time")
        end_rss = server.rss_mib()
        # The server gives freed heap back once it has gone quiet after serving (server/heap.py
        # IdleRelease, checked every 2 s): what it holds between bursts, beside the peak under load.
        time.sleep(QUIET_S)
        quiet_rss = server.rss_mib()
        print(
            f"soak RSS: {ready_rss:.0f} MiB once ready, {end_rss:.0f} MiB after {seconds:.0f} s at concurrency "
            f"{concurrency}, {quiet_rss:.0f} MiB {QUIET_S:.0f} s later (quiet), peak {max(peak, end_rss):.0f} MiB "
            f"(target <= 500 MiB); load exit {load.returncode}"
        )
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-model-rss", action="store_true", help="also each model's RSS over an empty server")
    ap.add_argument(
        "--soak", type=float, default=0.0, metavar="SECONDS", help="then the whole repository under load this long"
    )
    ap.add_argument("--concurrency", type=int, default=8, help="the soak's concurrent requests (default: 8)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = without_warmup(a.repository, Path(tmp) / "no_warmup")
        with_w: list[float] = []
        without_w: list[float] = []
        warm: dict[str, float] = {}
        for r in range(a.rounds):
            t_w, warm, rss_w = time_to_ready(a.repository, Path(tmp))
            t_n, _, rss_n = time_to_ready(bare, Path(tmp))
            with_w.append(t_w)
            without_w.append(t_n)
            print(
                f"round {r + 1}: with warm-up {t_w:.2f} s ({rss_w:.0f} MiB RSS), without {t_n:.2f} s "
                f"({rss_n:.0f} MiB RSS)",
                flush=True,
            )
        if a.per_model_rss:
            names = sorted(p.parent.name for p in a.repository.glob(f"*/{CONFIG_FILENAME}"))
            empty = time_to_ready(a.repository, Path(tmp), [])[2]
            print(f"RSS once ready: empty server {empty:.0f} MiB; each model adds (with its warm-up):")
            for name in names:
                print(f"  {name}: {time_to_ready(a.repository, Path(tmp), [name])[2] - empty:.0f} MiB", flush=True)
        if a.soak > 0:
            soak(a.repository, Path(tmp), a.soak, a.concurrency)
    if with_w:
        mw, mn = statistics.median(with_w), statistics.median(without_w)
        print(
            f"median cold start to ready: with warm-up {mw:.2f} s (target <= 5 s), without {mn:.2f} s; "
            f"warm-up adds {mw - mn:.2f} s ({mw / mn:.2f}x)"
        )
    for model, ms in sorted(warm.items()):
        print(f"  {model}: warm-up {ms:.0f} ms")
    print(f"load average: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
