"""Benchmark: the real server over loopback vs in-process ONNX Runtime on the same model, same run.

    .venv/bin/python benchmarks/bench_server.py --repository /tmp/bench_repo --models resnet18 mobilenet_v2

The repository must hold the models (e.g. `python -m export onnx resnet18 --repository DIR --weights none`
and `python -m export onnx mobilenet_v2 --repository DIR`); `--export` runs those commands first.
For each model: raw ONNX Runtime at batch sizes 1..32 (latency per batch, images/s), then the server
started as a subprocess, driven by tritonclient aio clients at each concurrency (every client sends
batch-1 requests back to back). Prints throughput, p50/p99 and the two target ratios:
  concurrency-8 throughput / raw throughput at its best batch   (target >= 0.95)
  concurrency-1 p50 - raw batch-1 p50                            (target <= 1 ms)
Raw ORT uses the session options the server's ONNX Runtime backend uses, with the same thread count.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def model_file(repo: Path, name: str) -> Path:
    versions = sorted(int(p.name) for p in (repo / name).iterdir() if p.is_dir() and p.name.isdigit())
    return repo / name / str(versions[-1]) / "model.onnx"


def ort_session(path: Path, threads: int):
    """A session configured as the server's ONNX Runtime backend configures its own.

    Plain onnxruntime here, not server.backends: this process also imports tritonclient, whose generated
    `inference.*` protos cannot live beside the server's (docs: known traps).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def bench_raw(path: Path, threads: int, batch_sizes: list[int], seconds: float) -> dict[int, dict]:
    sess = ort_session(path, threads)
    inp = sess.get_inputs()[0]
    out = {}
    for bs in batch_sizes:
        x = np.random.default_rng(0).standard_normal((bs, *inp.shape[1:])).astype(np.float32)
        for _ in range(2):
            sess.run(None, {inp.name: x})
        lat = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(lat) < 3:
            t = time.perf_counter()
            sess.run(None, {inp.name: x})
            lat.append(time.perf_counter() - t)
        out[bs] = {"ips": bs * len(lat) / sum(lat), "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                   "n": len(lat)}
    return out


async def bench_server_conc(url: str, model: str, input_name: str, shape: list[int], concurrency: int,
                            seconds: float) -> dict:
    import tritonclient.grpc.aio as tca
    from tritonclient.grpc import InferInput

    x = np.random.default_rng(1).standard_normal([1, *shape]).astype(np.float32)
    lat: list[float] = []
    async with tca.InferenceServerClient(url) as client:
        inp = InferInput(input_name, [1, *shape], "FP32")
        inp.set_data_from_numpy(x)
        for _ in range(3):
            await client.infer(model, [inp])
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await client.infer(model, [inp])
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        stats = await client.get_inference_statistics(model)
    s = stats.model_stats[0]
    n_exec = s.execution_count
    return {"ips": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "n": len(lat),
            "server_exec_total": n_exec, "server_infer_total": s.inference_count,
            "server_queue_ms_avg": s.inference_stats.queue.ns / max(1, s.inference_stats.queue.count) / 1e6,
            "server_compute_ms_avg": s.inference_stats.compute_infer.ns / max(1, s.inference_stats.compute_infer.count) / 1e6,
            "server_request_ms_avg": s.inference_stats.success.ns / max(1, s.inference_stats.success.count) / 1e6}


def start_server(repo: Path, models: list[str], threads: int, workdir: Path) -> tuple[subprocess.Popen, int]:
    ready = workdir / "ready.json"
    cmd = [sys.executable, "-m", "server", "--model-repository", str(repo), "--grpc-address", "127.0.0.1",
           "--grpc-port", "0", "--metrics-port", "0", "--metrics-address", "127.0.0.1", "--ready-file", str(ready),
           "--intra-op-threads", str(threads), "--inter-op-threads", "1", "--model-control-mode", "explicit",
           "--log-level", "warning"]
    for m in models:
        cmd += ["--load-model", m]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=open(workdir / "server.log", "w"), stderr=subprocess.STDOUT)
    t_end = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > t_end:
            proc.kill()
            raise SystemExit(f"server failed to start:\n{(workdir / 'server.log').read_text()}")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["grpc_port"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--export", action="store_true", help="export the models into --repository first")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, server and raw (default 2)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per point (default 8)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    if args.export:
        for m in args.models:
            weights = ["--weights", "none"] if m == "resnet18" else []
            subprocess.run([sys.executable, "-m", "export", "onnx", m, "--repository", str(args.repository),
                            *weights], cwd=ROOT, check=True)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        proc, port = start_server(args.repository, args.models, args.threads, Path(work))
        try:
            for m in args.models:
                path = model_file(args.repository, m)
                raw = bench_raw(path, args.threads, args.batch_sizes, args.seconds)
                inp = ort_session(path, 1).get_inputs()[0]
                served = {c: asyncio.run(bench_server_conc(f"127.0.0.1:{port}", m, inp.name, list(inp.shape[1:]), c,
                                                           args.seconds)) for c in args.concurrency}
                results[m] = {"raw": raw, "server": served}
        finally:
            proc.terminate()
            proc.wait(60)

    for m, r in results.items():
        print(f"\n== {m} (ONNX Runtime CPU, {args.threads} intra-op threads) ==")
        print(f"{'mode':<22}{'img/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'n':>7}")
        for bs, x in r["raw"].items():
            print(f"{'raw ORT batch ' + str(bs):<22}{x['ips']:9.1f}{x['p50_ms']:9.2f}{x['p99_ms']:9.2f}{x['n']:7d}")
        for c, x in r["server"].items():
            print(f"{'server conc ' + str(c):<22}{x['ips']:9.1f}{x['p50_ms']:9.2f}{x['p99_ms']:9.2f}{x['n']:7d}")
        best_bs = max(r["raw"], key=lambda b: r["raw"][b]["ips"])
        best = r["raw"][best_bs]["ips"]
        if 8 in r["server"]:
            print(f"conc-8 throughput / raw best (batch {best_bs}): {r['server'][8]['ips'] / best:.3f}  (target >= 0.95)")
        if 1 in r["server"] and 1 in r["raw"]:
            d = r["server"][1]["p50_ms"] - r["raw"][1]["p50_ms"]
            print(f"conc-1 p50 - raw batch-1 p50: {d:+.2f} ms  (target <= 1 ms)")
        last = r["server"][max(r["server"])]
        print(f"server-side averages (all runs): request {last['server_request_ms_avg']:.2f} ms, queue "
              f"{last['server_queue_ms_avg']:.2f} ms, compute {last['server_compute_ms_avg']:.2f} ms; "
              f"{last['server_infer_total']} items in {last['server_exec_total']} executions")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
