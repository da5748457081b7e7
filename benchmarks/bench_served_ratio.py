"""Served / raw, as users measure it: Triton's perf_analyzer against the server at one concurrency, over
the bytes path and system shared memory, against the served variant run raw in-process on its own
runtime with the same settings, interleaved in one run.

    .venv/bin/python benchmarks/bench_served_ratio.py --repository model_repository --model mobilenet_v2 \
        [--concurrency 8] [--seconds 2] [--rounds 4] [--parameter ENABLE_CPU_PINNING=NO ...] \
        [--perf-analyzer bash benchmarks/perf_analyzer.sh]

Raw is the server's own backend, built in this process by the server's loader (server.repository
.build_model) from the same config.pbtxt with the same server-wide threads: the same file, variant,
runtime, compile properties (streams, threads, pinning, precision hint, bounded batch) and infer
requests; only the batcher and the frontend are missing. First it runs batch 1, 2, 4 and 8 from one
thread (one execution at a time) and from as many threads as the backend takes executions at once (its
`concurrent_executions`: OpenVINO's infer requests); the best of these is the reference. Then rounds of
raw-best, perf_analyzer over shared memory and over bytes, rotated, each served figure divided by the raw
figure of its own round (other jobs' load drifts; a round's three slices share it): the target is met
on the median of those ratios. The settings both sides resolved (OpenVINO's compiled properties: the
server logs them at load) are printed and compared. `--parameter KEY=VALUE` writes a config parameter
(an OpenVINO property the backend passes through, e.g. PERFORMANCE_HINT=THROUGHPUT,
ENABLE_CPU_PINNING=NO) into the measured copy of the model, so server and raw change together.

Targets (issue 19): served / raw >= 0.85 through shared memory, >= 0.75 through bytes. perf_analyzer
shares the machine's cores with the server, so on a small machine its own CPU shows up in the bytes
figure. On a machine other jobs load, wall-clock ratios also measure how the scheduler shares the cores
(the server with perf_analyzer runs many more threads than raw, so it gets more of them, and served can
come out above raw). The CPU time per image does not depend on that: raw (this process's, at the best
point) against the server's per request and the server's plus perf_analyzer's, printed as raw / served
(1.0: serving costs no CPU beyond the runtime's; raw at its best batch may leave cores idle that the
server fills, so this is not a throughput forecast). The server's resident memory is printed after the
run; `--serve-all` serves every model of the repository beside it, for the whole repository's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_frontend import perf_analyzer, repository_target, start, write_repository  # noqa: E402
from bench_server import pct  # noqa: E402
from cnncore.loopback import vmrss_mib  # noqa: E402

TARGETS = {"pa-shm": 0.85, "pa-bytes": 0.75}  # served / raw at the concurrency measured
RAW_BATCHES = (1, 2, 4, 8)


def set_parameters(config: Path, parameters: list[str]) -> None:
    """KEY=VALUE config parameters, added to (or replacing those in) a config.pbtxt."""
    from google.protobuf import text_format

    from cnncore.config import load_config

    cfg = load_config(config.parent)
    for kv in parameters:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"--parameter {kv!r}: expected KEY=VALUE")
        cfg.parameters[key].string_value = value
    config.write_text(text_format.MessageToString(cfg))


def raw_backend(model_dir: Path, threads: int):  # -> server.backends.base.Backend
    """The model's first instance as the server builds it (variant choice, options, compile, warm-up)."""
    from server.repository import RuntimeDefaults, build_model

    built = build_model(model_dir, RuntimeDefaults(intra_op_threads=threads))
    for b in built[1:]:
        for inst in b.instances:
            inst.close()
    for inst in built[0].instances[1:]:
        inst.close()
    return built[0].instances[0]


class RawPoint:
    def __init__(self) -> None:
        self.items = 0
        self.wall = 0.0
        self.cpu = 0.0  # this process's CPU seconds (all threads) while it ran
        self.lat: list[float] = []

    def ips(self) -> float:
        return self.items / self.wall if self.wall else float("nan")

    def add(self, other: RawPoint) -> None:
        self.items, self.wall, self.cpu = self.items + other.items, self.wall + other.wall, self.cpu + other.cpu
        self.lat += other.lat


def run_raw(backend, batch: int, threads: int, seconds: float, point: RawPoint) -> None:
    """`threads` loops, each executing its own batch of `batch` random items back to back."""
    spec = backend.inputs[0]
    rng = np.random.default_rng(0)
    feeds = [
        {s.name: rng.standard_normal((batch, *s.shape)).astype(s.dtype) for s in backend.inputs} for _ in range(threads)
    ]
    assert all(-1 not in s.shape for s in backend.inputs), f"{spec.name}: raw needs static per-item shapes"
    for f in feeds:
        backend.execute(f)  # this batch size's first run: kernels, buffers
    lat: list[list[float]] = [[] for _ in range(threads)]
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop or len(lat[i]) < 2:
            t = time.perf_counter()
            backend.execute(feeds[i])
            lat[i].append(time.perf_counter() - t)

    t0, cpu0 = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    point.wall += time.perf_counter() - t0
    point.cpu += time.process_time() - cpu0
    point.items += batch * sum(len(x) for x in lat)
    point.lat += [x for xs in lat for x in xs]


def server_properties(log: Path) -> list[dict]:
    """What the server's OpenVINO instances resolved their compile properties to (its load log)."""
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "openvino model compiled":
            out.append({"properties": rec["properties"], "infer_requests": rec["infer_requests"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="runtime threads, server and raw (default 2)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per point per round (default 2)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of raw-best / shm / bytes (default 4)")
    ap.add_argument("--parameter", action="append", default=[], metavar="KEY=VALUE", help="config parameter")
    ap.add_argument("--serve-all", action="store_true", help="load every model of --repository (RSS of all)")
    ap.add_argument("--perf-analyzer", nargs="+", default=["bash", str(ROOT / "benchmarks" / "perf_analyzer.sh")])
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ratio_"))
    models = sorted(p.parent.name for p in a.repository.glob("*/config.pbtxt")) if a.serve_all else [a.model]
    write_repository(work / "repo", a.repository, models)
    if a.parameter:
        set_parameters(work / "repo" / a.model / "config.pbtxt", a.parameter)
    target = repository_target(work / "repo", a.model)
    load_before = os.getloadavg()
    backend = raw_backend(work / "repo" / a.model, a.threads)
    raw_props = {"properties": getattr(backend, "properties", {}), "infer_requests": backend.concurrent_executions}
    proc, info = start(
        [
            sys.executable,
            "-m",
            "server",
            "--model-repository",
            str(work / "repo"),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--metrics-address",
            "127.0.0.1",
            "--allow-http",
            "false",
            "--log-level",
            "info",  # the load's "openvino model compiled" line: the settings the server runs with
            "--intra-op-threads",
            str(a.threads),
            "--model-control-mode",
            "explicit",
            *[x for m in models for x in ("--load-model", m)],
        ],
        work,
        "server",
    )
    thread_counts = sorted({1, backend.concurrent_executions})
    sweep = {(bs, t): RawPoint() for bs in RAW_BATCHES for t in thread_counts}
    raw_best = RawPoint()
    served: dict[str, list[dict]] = {"pa-shm": [], "pa-bytes": []}
    raw_rounds: list[float] = []
    try:
        # 1. raw at every batch and thread count, forward then backward: the reference is the best
        for order in (list(sweep), list(sweep)[::-1]):
            for bs, t in order:
                run_raw(backend, bs, t, a.seconds / 2, sweep[(bs, t)])
        best_bs, best_t = max(sweep, key=lambda k: sweep[k].ips())
        # 2. rounds of raw-best / shm / bytes, rotated, so each served figure has a raw one next to it
        steps = ["raw", *served]
        for r in range(a.rounds):
            for step in steps[r % 3 :] + steps[: r % 3]:
                if step == "raw":
                    pt = RawPoint()
                    run_raw(backend, best_bs, best_t, a.seconds, pt)
                    raw_rounds.append(pt.ips())
                    raw_best.add(pt)
                    continue
                res = perf_analyzer(
                    a.perf_analyzer,
                    info["grpc_port"],
                    info["metrics_port"],
                    [proc.pid],
                    step,
                    target,
                    a.concurrency,
                    a.seconds,
                )
                # perf_analyzer's stable figure; where it found no stable window, what the server answered
                res["ips"], res["stable"] = (
                    (res["rps"], True) if res["rps"] == res["rps"] else (res["server_rps"], False)
                )
                served[step].append(res)
        rss = vmrss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
        backend.close()
    srv_props = server_properties(work / "server.log")
    load_after = os.getloadavg()
    print(
        f"\n{a.model} ({type(backend).__name__}, {backend.model_file.name}), {a.threads} threads, concurrency "
        f"{a.concurrency}, {a.rounds} rounds x {a.seconds:g} s, {os.cpu_count()} CPUs, load {load_before[0]:.1f} "
        f"before, {load_after[0]:.1f} after (1-min average)"
    )
    print(f"  parameters: {', '.join(a.parameter) or '(the config as exported)'}")
    print(f"  raw settings:    {json.dumps(raw_props, sort_keys=True)}")
    for p in srv_props:
        print(f"  server settings: {json.dumps(p, sort_keys=True)}")
    if srv_props:
        same = all(p == raw_props for p in srv_props)
        print(f"  settings identical (raw vs server): {'yes' if same else 'NO: the ratio compares different setups'}")
    for (bs, t), pt in sweep.items():
        print(
            f"  raw batch {bs:<2} x {t} thread(s) {pt.ips():8.1f} img/s  p50 {pct(pt.lat, 50) * 1e3:7.2f} ms / batch  "
            f"CPU {pt.cpu / max(1, pt.items) * 1e6:6.0f} us/img"
        )
    print(
        f"  raw best: batch {best_bs} x {best_t} thread(s), in the rounds {raw_best.ips():.1f} img/s "
        f"({', '.join(f'{x:.0f}' for x in raw_rounds)})"
    )
    raw_cpu_us = raw_best.cpu / raw_best.items * 1e6
    print(f"  raw CPU per image (best): {raw_cpu_us:.0f} us")
    for mode, runs in served.items():
        ips = [x["ips"] for x in runs]
        per_round = [x / raw for x, raw in zip(ips, raw_rounds, strict=True)]
        ratio = float(np.median(per_round))
        verdict = "PASS" if ratio >= TARGETS[mode] else "MISS"
        unstable = sum(not x["stable"] for x in runs)
        note = f", {unstable} round(s) from the server's count (no stable perf_analyzer window)" if unstable else ""
        print(
            f"  served {mode:<9} {float(np.mean(ips)):8.1f} img/s ({', '.join(f'{x:.0f}' for x in ips)})  "
            f"p50 {float(np.nanmean([x['p50_ms'] for x in runs] or [np.nan])):7.2f} ms  "
            f"server CPU {float(np.nanmean([x['cpu_us'] for x in runs])):6.0f} us/req{note}"
        )
        print(
            f"    served/raw per round {', '.join(f'{x:.2f}' for x in per_round)}; median {ratio:.2f}, overall "
            f"{float(np.mean(ips)) / raw_best.ips():.2f} (target >= {TARGETS[mode]:.2f}: {verdict})"
        )
        server_cpu = float(np.nanmean([x["cpu_us"] for x in runs]))
        client_cpu = float(np.nanmean([x["client_cpu_us"] for x in runs]))
        print(
            f"    CPU per image raw / served (load-independent): server {raw_cpu_us / server_cpu:.2f}, "
            f"server + perf_analyzer ({client_cpu:.0f} us/req) {raw_cpu_us / (server_cpu + client_cpu):.2f}"
        )
    print(f"  server RSS after the run ({len(models)} model(s) loaded): {rss:.0f} MiB")


if __name__ == "__main__":
    main()
