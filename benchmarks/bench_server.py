"""Benchmark: the real server over loopback vs the raw runtimes in-process on the same model, same run.

    .venv/bin/python benchmarks/bench_server.py --repository /tmp/bench_repo --models resnet18 mobilenet_v2

The repository must hold the models (`python -m export onnx resnet18 --repository DIR --weights none`,
`python -m export onnx mobilenet_v2 --repository DIR`); `--export` runs those commands first.
For each model, in interleaved rounds whose order rotates (so a machine whose load drifts affects every
side alike):
raw ONNX Runtime at each batch size, and the server (a subprocess) driven by tritonclient aio clients at
each concurrency, every client sending batch-1 requests back to back. Prints images/s, p50/p99, the
server's own breakdown per point (queue, compute, the rest = protocol/copies/event loop; mean executed
batch; `input` is gathering the batch and, for ONNX Runtime, waiting while the instance's other slot
runs) and the target ratios:
  concurrency-8 throughput / raw throughput at its best batch   (target >= 0.95)
  concurrency-1 p50 - raw batch-1 p50                            (target <= 1.5 ms)
Raw ORT uses the session options of the server's ONNX Runtime backend, with the same thread count.
Each server point also gives the CPU time per request of the server process (from /proc) and of this
process (the tritonclient client), which on a machine whose cores the client shares is part of the
latency.

`--kserve` adds KServe 0.21 serving the same file (benchmarks/kserve_onnx_model.py, in the separate venv
benchmarks/kserve_venv.sh creates) to the same rounds, driven over gRPC by the same clients, and prints
served / KServe throughput per concurrency (target >= 1.3 at concurrency 8) and its p50s.

Where `export` chose another variant than FP32 on ONNX Runtime (model.json's `serving`: INT8 and/or
OpenVINO), the raw side has two rows per batch: "raw ORT FP32" (the FP32 parent, re-exported into a
temporary directory) and "raw served" (the served file on the served runtime, the raw best gated
variant), and the ratios are printed against both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from cnncore.artifacts import ONNX_FILENAME
from cnncore.runtime import OpenVinoSettings, OrtRunner, OrtSettings, openvino_runner
from cnncore.runtime import ort_runner as ort_runner_of

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def model_file(repo: Path, name: str) -> Path:
    # Not cnncore.layout: it loads cnncore.config and with it the project's protos, which cannot live
    # beside tritonclient's in this process (see ort_runner).
    versions = sorted(int(p.name) for p in (repo / name).iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise SystemExit(f"{repo / name}: no version directory")
    return repo / name / str(versions[-1]) / ONNX_FILENAME


def ort_runner(path: Path, threads: int, spinning: bool = False) -> OrtRunner:
    """The file on ONNX Runtime with the server's backend settings (the runtime layer's), same threads.

    The runtime layer loads none of the project's protos: this process also imports tritonclient, whose
    generated `inference.*` protos cannot live beside the server's (docs: known traps).
    """
    return ort_runner_of(path, OrtSettings(intra_op_threads=threads, inter_op_threads=1, allow_spinning=spinning))


class Point:
    """Accumulates one configuration's measurements over rounds."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.items = 0
        self.wall = 0.0
        self.server: dict[str, float] = defaultdict(float)
        self.cpu_server = 0.0  # seconds of the server process's CPU while this point ran
        self.cpu_client = 0.0  # seconds of this process's CPU (the client) meanwhile

    def row(self) -> dict:
        out = {
            "ips": self.items / self.wall if self.wall else float("nan"),
            "p50_ms": pct(self.lat, 50) * 1e3,
            "p99_ms": pct(self.lat, 99) * 1e3,
            "n": len(self.lat),
            "mean_ms": float(np.mean(self.lat)) * 1e3 if self.lat else float("nan"),
        }
        if self.cpu_server and self.lat:
            out.update(
                server_cpu_ms=self.cpu_server / len(self.lat) * 1e3, client_cpu_ms=self.cpu_client / len(self.lat) * 1e3
            )
        s = self.server
        if s.get("requests"):
            n = s["requests"]
            out.update(
                server_request_ms=s["request_ns"] / n / 1e6,
                server_queue_ms=s["queue_ns"] / n / 1e6,
                server_input_ms=s["input_ns"] / n / 1e6,
                server_compute_ms=s["infer_ns"] / n / 1e6,
                server_other_ms=(s["request_ns"] - s["queue_ns"] - s["input_ns"] - s["infer_ns"]) / n / 1e6,
                mean_batch=s["items"] / max(1, s["executions"]),
            )
        return out


def run_raw(run, bs: int, seconds: float, point: Point) -> None:
    """`run`: a runtime layer runner (its input_shape: one item's, static)."""
    x = np.random.default_rng(0).standard_normal((bs, *run.input_shape)).astype(np.float32)
    run(x)
    t_end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < t_end or n < 2:
        t = time.perf_counter()
        run(x)
        dt = time.perf_counter() - t
        point.lat.append(dt)
        point.wall += dt
        point.items += bs
        n += 1


def process_cpu_s(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_server(
    url: str,
    model: str,
    input_name: str,
    shape: list[int],
    concurrency: int,
    seconds: float,
    point: Point,
    pid: int,
    statistics: bool = True,
) -> None:
    """`pid`: the server process (its CPU time is read); `statistics`: it answers ModelStatistics
    (KServe does not), whose queue / compute breakdown the point then records."""
    import tritonclient.grpc.aio as tca
    from tritonclient.grpc import InferInput

    x = np.random.default_rng(1).standard_normal([1, *shape]).astype(np.float32)
    async with tca.InferenceServerClient(url) as client:
        inp = InferInput(input_name, [1, *shape], "FP32")
        inp.set_data_from_numpy(x)
        await asyncio.gather(*(client.infer(model, [inp]) for _ in range(concurrency)))  # warm connections
        if statistics:
            before = (await client.get_inference_statistics(model)).model_stats[0]
        stop = time.perf_counter() + seconds
        lat: list[float] = []

        async def worker() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await client.infer(model, [inp])
                lat.append(time.perf_counter() - t)

        t0, cpu0, cpu_self0 = time.perf_counter(), process_cpu_s(pid), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        point.wall += time.perf_counter() - t0
        point.cpu_server += process_cpu_s(pid) - cpu0
        point.cpu_client += time.process_time() - cpu_self0
        if not statistics:
            point.lat += lat
            point.items += len(lat)
            return
        after = (await client.get_inference_statistics(model)).model_stats[0]
    point.lat += lat
    point.items += len(lat)
    a, b = after.inference_stats, before.inference_stats
    s = point.server
    s["requests"] += a.success.count - b.success.count
    s["request_ns"] += a.success.ns - b.success.ns
    s["queue_ns"] += a.queue.ns - b.queue.ns
    s["input_ns"] += a.compute_input.ns - b.compute_input.ns  # gathering, and waiting for the runtime
    s["infer_ns"] += a.compute_infer.ns - b.compute_infer.ns
    s["items"] += after.inference_count - before.inference_count
    s["executions"] += after.execution_count - before.execution_count


def raw_sides(repo: Path, name: str, threads: int, spinning: bool, workdir: Path) -> dict[str, object]:
    """label -> raw runner: ORT FP32 always; the served variant too when it is something else."""
    # model.json read as plain JSON: cnncore.spec would load the project's protos, which cannot live
    # beside tritonclient's in this process (see ort_runner)
    served_file = model_file(repo, name)
    meta = json.loads((repo / name / "model.json").read_text()) if (repo / name / "model.json").is_file() else {}
    serving = argparse.Namespace(**meta["serving"]) if meta.get("serving") else None
    if serving is None or (serving.precision, serving.runtime) == ("fp32", "onnxruntime"):
        return {"raw ORT": ort_runner(served_file, threads, spinning)}
    fp32_file = served_file
    if serving.precision != "fp32":  # the FP32 parent is not in the repository: export it again
        subprocess.run(
            [
                sys.executable,
                "-m",
                "export",
                "onnx",
                name,
                "--repository",
                str(workdir / "fp32"),
                "--precision",
                "fp32",
                "--runtime",
                "onnxruntime",
            ],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        fp32_file = model_file(workdir / "fp32", name)
    sides: dict[str, object] = {"raw ORT FP32": ort_runner(fp32_file, threads, spinning)}
    if serving.runtime == "openvino":
        sides[f"raw {serving.precision.upper()} openvino"] = openvino_runner(
            served_file, OpenVinoSettings(threads=threads)
        )
    else:
        sides[f"raw {serving.precision.upper()} {serving.runtime}"] = ort_runner(served_file, threads, spinning)
    return sides


def start_server(
    repo: Path, models: list[str], threads: int, spinning: bool, workdir: Path
) -> tuple[subprocess.Popen, int]:
    ready = workdir / "ready.json"
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
        "--metrics-port",
        "0",
        "--metrics-address",
        "127.0.0.1",
        "--allow-http",
        "false",
        "--ready-file",
        str(ready),
        "--intra-op-threads",
        str(threads),
        "--inter-op-threads",
        "1",
        "--model-control-mode",
        "explicit",
        "--ort-allow-spinning",
        str(spinning).lower(),
        "--log-level",
        "warning",
    ]
    for m in models:
        cmd += ["--load-model", m]
    with open(workdir / "server.log", "w") as log:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT
        )
    t_end = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > t_end:
            proc.kill()
            raise SystemExit(f"server failed to start:\n{(workdir / 'server.log').read_text()}")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["grpc_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_kserve(model: str, file: Path, threads: int, workdir: Path) -> tuple[subprocess.Popen, int]:
    """KServe 0.21 serving `file` as `model` (benchmarks/kserve_onnx_model.py in the venv
    benchmarks/kserve_venv.sh makes); returns the process and its gRPC port once the model is ready."""
    import tritonclient.grpc as tc

    python = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "kserve_venv.sh")], check=True, capture_output=True, text=True
    ).stdout.strip()
    grpc_port, http_port = free_port(), free_port()
    log_path = workdir / f"kserve-{model}.log"
    cmd = [
        python,
        str(ROOT / "benchmarks" / "kserve_onnx_model.py"),
        "--model-file",
        str(file),
        "--model-name",
        model,
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--intra-op-threads",
        str(threads),
    ]
    # KServe's per-request info logs off, as the server's (--log-level warning)
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = tc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    t_end = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > t_end:
            proc.kill()
            raise SystemExit(f"KServe failed to start:\n{log_path.read_text()}")
        try:
            if client.is_model_ready(model):
                break
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    client.close()
    return proc, grpc_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--export", action="store_true", help="export the models into --repository first")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, server and raw (default 2)")
    ap.add_argument(
        "--spinning",
        action="store_true",
        help="let ONNX Runtime threads spin, server and raw alike (default off, as the server)",
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per point per round (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--kserve",
        action="store_true",
        help="also serve each model with KServe 0.21 (benchmarks/kserve_venv.sh) and compare, same rounds",
    )
    args = ap.parse_args()

    if args.export:
        for m in args.models:
            weights = ["--weights", "none"] if m == "resnet18" else []
            subprocess.run(
                [sys.executable, "-m", "export", "onnx", m, "--repository", str(args.repository), *weights],
                cwd=ROOT,
                check=True,
            )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        proc, port = start_server(args.repository, args.models, args.threads, args.spinning, Path(work))
        try:
            for m in args.models:
                sides = raw_sides(args.repository, m, args.threads, args.spinning, Path(work))
                inp = ort_runner(model_file(args.repository, m), args.threads)
                shape = [d for d in inp.input_shape if isinstance(d, int)]
                if len(shape) != len(inp.input_shape):  # the requests are built from it
                    raise SystemExit(f"{m}: the benchmark needs a static input shape, got {inp.input_shape}")
                raw = {(label, bs): Point() for label in sides for bs in args.batch_sizes}
                served = {c: Point() for c in args.concurrency}
                kserved = {c: Point() for c in args.concurrency} if args.kserve else {}
                kserve = (
                    start_kserve(m, model_file(args.repository, m), args.threads, Path(work)) if args.kserve else None
                )
                url = f"127.0.0.1:{port}"
                phases: list[tuple[str, int]] = [("raw", 0)]
                for c in args.concurrency:
                    phases += [("server", c)] + ([("kserve", c)] if kserve is not None else [])
                try:
                    for rnd in range(args.rounds):
                        # rotated each round: whatever runs first after a phase change (or a load swing)
                        # falls on each side alike
                        k = rnd % len(phases)
                        for side, c in phases[k:] + phases[:k]:
                            if side == "raw":
                                for (label, bs), point in raw.items():
                                    run_raw(sides[label], bs, args.seconds, point)
                            elif side == "server":
                                asyncio.run(
                                    run_server(url, m, inp.input_name, shape, c, args.seconds, served[c], proc.pid)
                                )
                            else:
                                assert kserve is not None
                                kurl = f"127.0.0.1:{kserve[1]}"
                                asyncio.run(
                                    run_server(
                                        kurl,
                                        m,
                                        inp.input_name,
                                        shape,
                                        c,
                                        args.seconds,
                                        kserved[c],
                                        kserve[0].pid,
                                        False,
                                    )
                                )
                        print(f"{m}: round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
                finally:
                    if kserve is not None:
                        kserve[0].terminate()
                        kserve[0].wait(60)
                results[m] = {
                    "raw": {f"{label} batch {bs}": p.row() for (label, bs), p in raw.items()},
                    "server": {c: p.row() for c, p in served.items()},
                    "kserve": {c: p.row() for c, p in kserved.items()},
                }
        finally:
            proc.terminate()
            proc.wait(60)

    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
    for m, r in results.items():
        spinning = "on" if args.spinning else "off"
        print(
            f"\n== {m} (ONNX Runtime CPU, {args.threads} intra-op threads, spinning {spinning}; "
            f"{args.rounds} rounds x {args.seconds:g} s) =="
        )
        print(
            f"{'mode':<30}{'img/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'n':>6}{'CPU/req ms':>16}   "
            "server: request = queue + input + compute + other ms, mean batch"
        )
        print(f"{'':<62}{'server':>8}{'client':>8}")
        for key, x in r["raw"].items():
            print(f"{key:<30}{x['ips']:8.1f}{x['p50_ms']:9.2f}{x['p99_ms']:9.2f}{x['n']:6d}")
        for side, points in (("server", r["server"]), ("KServe", r.get("kserve", {}))):
            for c, x in points.items():
                cpu = f"{x['server_cpu_ms']:8.2f}{x['client_cpu_ms']:8.2f}" if "server_cpu_ms" in x else " " * 16
                extra = (
                    (
                        f"   {x['server_request_ms']:.2f} = {x['server_queue_ms']:.2f} + {x['server_input_ms']:.2f} + "
                        f"{x['server_compute_ms']:.2f} + {x['server_other_ms']:.2f}, {x['mean_batch']:.1f}"
                    )
                    if "server_request_ms" in x
                    else ""
                )
                print(
                    f"{side + ' conc ' + str(c):<30}{x['ips']:8.1f}{x['p50_ms']:9.2f}{x['p99_ms']:9.2f}{x['n']:6d}"
                    f"{cpu}{extra}"
                )
        for label in dict.fromkeys(k.rsplit(" batch ", 1)[0] for k in r["raw"]):
            rows = {k: x for k, x in r["raw"].items() if k.rsplit(" batch ", 1)[0] == label}
            best_key = max(rows, key=lambda k: rows[k]["ips"])
            best = rows[best_key]["ips"]
            for c in (1, 8):
                if c in r["server"]:
                    print(f"conc-{c} throughput / {best_key} (best batch): {r['server'][c]['ips'] / best:.3f}")
            if 1 in r["server"] and f"{label} batch 1" in rows:
                d = r["server"][1]["p50_ms"] - rows[f"{label} batch 1"]["p50_ms"]
                print(f"conc-1 p50 - {label} batch-1 p50: {d:+.2f} ms  (target <= 1.5 ms)")
        one = r["server"].get(1, {})
        if "server_compute_ms" in one:
            # The same requests' compute, measured inside the server, taken out of their latency: what the
            # request path costs, whatever the compute did under other jobs' load meanwhile.
            path = one["mean_ms"] - one["server_compute_ms"]
            inside = one["server_request_ms"] - one["server_compute_ms"]
            print(
                f"conc-1 mean latency - the server's mean compute of the same requests: {path:+.2f} ms = "
                f"{inside:.2f} in the server (queue {one['server_queue_ms']:.2f}) + {path - inside:.2f} in gRPC and "
                f"the client; CPU per request: server {one['server_cpu_ms']:.2f}, client {one['client_cpu_ms']:.2f} ms"
            )
        for c, k in r.get("kserve", {}).items():
            x = r["server"][c]
            print(
                f"conc-{c} throughput served / KServe: {x['ips'] / k['ips']:.3f}"
                f"{'  (target >= 1.3)' if c == 8 else ''}; p50 {x['p50_ms']:.2f} vs {k['p50_ms']:.2f} ms"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
