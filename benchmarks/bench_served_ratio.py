"""Served / raw, as users measure it: Triton's perf_analyzer against the server at one concurrency, over
the bytes path and system shared memory, against the served variant run raw in-process on its own
runtime with the same threads, interleaved in one run.

    .venv/bin/python benchmarks/bench_served_ratio.py --repository model_repository --model mobilenet_v2 \
        [--concurrency 8] [--seconds 3] [--rounds 2] [--perf-analyzer bash benchmarks/perf_analyzer.sh]

The raw side is the file the repository serves (model.json `serving`: OpenVINO or ONNX Runtime, FP32 or
INT8) at batch 1 and 8 with the server's runtime settings; its best batch is the reference. The
server's resident memory is printed after the run (what a soak at this concurrency leaves);
`--serve-all` serves every model of the repository beside it, for the whole repository's RSS. Target
(issue 19): served / raw >= 0.85 through shared memory, >= 0.75 through bytes. perf_analyzer shares the
machine's cores with the server, so on a small machine its own CPU shows up in the bytes figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cold_start import rss_mib  # noqa: E402
from bench_frontend import perf_analyzer, repository_target, start, write_repository  # noqa: E402
from bench_server import Point, model_file, ort_runner, run_raw  # noqa: E402
from cnncore.runtime import OpenVinoRunner, OpenVinoSettings, OrtRunner, compile_openvino  # noqa: E402


def raw_runner(repo: Path, name: str, threads: int, max_batch: int) -> tuple[str, OpenVinoRunner | OrtRunner]:
    """The served file on its runtime as the server sets it up (OpenVINO: the batch bounded by the
    config's max_batch_size, as the backend compiles it; unbounded dynamic shapes run slower kernels)."""
    meta = json.loads((repo / name / "model.json").read_text()) if (repo / name / "model.json").is_file() else {}
    runtime = (meta.get("serving") or {}).get("runtime", "onnxruntime")
    path = model_file(repo, name)
    if runtime == "openvino":
        return f"raw {runtime}", OpenVinoRunner(
            compile_openvino(path, OpenVinoSettings(threads=threads).properties(), max_batch=max_batch)
        )
    return f"raw {runtime}", ort_runner(path, threads)


def target_max_batch(model_dir: Path) -> int:
    from cnncore.config import load_config

    return load_config(model_dir).max_batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="runtime threads, server and raw (default 2)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--serve-all", action="store_true", help="load every model of --repository (RSS of all)")
    ap.add_argument("--perf-analyzer", nargs="+", default=["bash", str(ROOT / "benchmarks" / "perf_analyzer.sh")])
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ratio_"))
    models = sorted(p.parent.name for p in a.repository.glob("*/config.pbtxt")) if a.serve_all else [a.model]
    write_repository(work / "repo", a.repository, models)
    target = repository_target(work / "repo", a.model)
    label, raw = raw_runner(a.repository, a.model, a.threads, target_max_batch(work / "repo" / a.model))
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
            "warning",
            "--intra-op-threads",
            str(a.threads),
            "--model-control-mode",
            "explicit",
            *[x for m in models for x in ("--load-model", m)],
        ],
        work,
        "server",
    )
    raw_pts = {bs: Point() for bs in (1, 8)}
    served: dict[str, list[dict]] = {"pa-bytes": [], "pa-shm": []}
    try:
        for r in range(a.rounds):
            for bs, pt in raw_pts.items():
                run_raw(raw, bs, a.seconds, pt)
            for mode in ("pa-bytes", "pa-shm") if r % 2 == 0 else ("pa-shm", "pa-bytes"):
                served[mode].append(
                    perf_analyzer(
                        a.perf_analyzer,
                        info["grpc_port"],
                        info["metrics_port"],
                        [proc.pid],
                        mode,
                        target,
                        a.concurrency,
                        a.seconds,
                    )
                )
        rss = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    best_bs, best = max(((bs, pt.row()["ips"]) for bs, pt in raw_pts.items()), key=lambda x: x[1])
    print(
        f"\n{a.model}, {a.threads} threads, concurrency {a.concurrency}, {a.rounds} x {a.seconds:g} s, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    for bs, pt in raw_pts.items():
        row = pt.row()
        print(f"  {label} batch {bs:<3} {row['ips']:8.1f} img/s  p50 {row['p50_ms']:7.2f} ms")
    for mode, runs in served.items():
        rps = float(np.nanmean([x["rps"] for x in runs]))
        p50 = float(np.nanmean([x["p50_ms"] for x in runs]))
        cpu = float(np.nanmean([x["cpu_us"] for x in runs]))
        print(
            f"  served {mode:<9} {rps:8.1f} img/s  p50 {p50:7.2f} ms  server CPU {cpu:6.0f} us/req  "
            f"served/raw (batch {best_bs}) {rps / best:.2f}"
        )
    print(f"  server RSS after the run ({len(models)} model(s) loaded): {rss:.0f} MiB")


if __name__ == "__main__":
    main()
