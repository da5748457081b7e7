"""Frontend capacity: what receiving, checking and answering a request costs, with a model that costs nothing.

    .venv/bin/python benchmarks/bench_frontend.py [--seconds 4] [--rounds 2] [--concurrency 8]

An identity model (built with onnx.helper) on FP32 [3,224,224] (602 KB, an image tensor), on UINT8
[3,224,224] (150 KB: the pixels an `export --input-dtype uint8` model takes) and FP32 [1,28,28]
(3 KB), served as users run it (`python -m server`, a subprocess), driven in one run, interleaved over
rounds, by the same asyncio driver (bench_vision.drive) sending pre-serialized ModelInferRequests
through a bare grpc.aio channel (no client-side protobuf work per request, so the driver stays as cheap
as a Python driver can be) in these ways:
  bytes      the tensor in raw_input_contents, the output back in raw_output_contents;
  shm        input and output in system shared memory (the request carries only their region names);
  echo       the floor: a bare grpc.aio server (a subprocess) that returns the request bytes unparsed;
each against 1 and 2 server workers (--workers), every driver loop on its own connection.
`--perf-analyzer bash benchmarks/perf_analyzer.sh` adds Triton's C++ perf_analyzer as a second driver
(pa-shm = --shared-memory system on both identity models, pa-bytes on the small one: on 600 KB
responses perf_analyzer's memory grows without bound here) -- its client costs far less CPU than
any Python one, so on a small machine its requests/s come closer to what the server alone can do.
`--repository DIR --models NAME...` adds real models from a repository (e.g. mobilenet_v2 from
`python -m export onnx mobilenet_v2`), served by the same servers beside the identity models, to see
what the workers do when the model itself costs CPU.
Prints requests/s and the server's CPU time per request (user+system of the server's processes, read
from /proc, so it does not depend on how fast the driver is) and the ratios the issue asks for:
  shm / bytes requests/s for the 602 KB tensor (target >= 1.5x, with shared memory read and written by
  pread/pwrite: see server/shared_memory.py), 2 workers / 1 worker (target >= 1.4x),
  and bytes-path CPU per request / echo CPU per request (what the server adds over gRPC itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench_server import pct  # noqa: E402  (same folder)
from bench_vision import drive  # noqa: E402
from cnncore.config import load_config  # noqa: E402
from protos import grpc_service_pb2 as pb  # noqa: E402
from protos.model_config_pb2 import DataType  # noqa: E402

SHAPES = {"image": [3, 224, 224], "image_u8": [3, 224, 224], "mnist": [1, 28, 28]}
DATATYPES = {"image_u8": "UINT8"}  # the rest FP32; image_u8 is what `export --input-dtype uint8` models take
_NUMPY = {"FP32": np.float32, "UINT8": np.uint8}


@dataclass(frozen=True)
class Target:
    """One model as the driver sees it: its first input and first output (same datatype)."""

    label: str
    model: str
    input: str
    shape: list[int]
    output: str
    output_nbytes: int  # of one item
    datatype: str = "FP32"


def identity_targets() -> list[Target]:
    out = []
    for name, shape in SHAPES.items():
        dt = DATATYPES.get(name, "FP32")
        out.append(
            Target(name, f"identity_{name}", "x", shape, "y", np.dtype(_NUMPY[dt]).itemsize * int(np.prod(shape)), dt)
        )
    return out


def repository_target(repo: Path, name: str) -> Target:
    cfg = load_config(repo / name / "config.pbtxt")
    i, o = cfg.input[0], cfg.output[0]
    if i.data_type != DataType.TYPE_FP32 or o.data_type != DataType.TYPE_FP32:
        raise SystemExit(f"{name}: the driver sends and receives FP32 tensors only")
    return Target(name, name, i.name, list(i.dims), o.name, 4 * int(np.prod(list(o.dims))))


INFER = "/inference.GRPCInferenceService/ModelInfer"
ECHO = "/bench.Echo/Echo"
CHANNEL_OPTS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]  # a connection per channel: spread over workers
_TICK = os.sysconf("SC_CLK_TCK")
PERF_ANALYZER_MEMORY = 4 << 30


def identity_model(shape: list[int], datatype: str = "FP32") -> bytes:
    from onnx import TensorProto, helper

    elem = TensorProto.UINT8 if datatype == "UINT8" else TensorProto.FLOAT

    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem, ["N", *shape])],
        [helper.make_tensor_value_info("y", elem, ["N", *shape])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def write_repository(repo: Path, extra: Path | None, models: list[str]) -> None:
    for name in models:  # served beside the identity models (copied: the server may not write there)
        assert extra is not None, "models to serve need the repository they come from"
        shutil.copytree(extra / name, repo / name)
    for name, shape in SHAPES.items():
        d = repo / f"identity_{name}"
        (d / "1").mkdir(parents=True, exist_ok=True)
        (d / "1" / "model.onnx").write_bytes(identity_model(shape, DATATYPES.get(name, "FP32")))
        (d / "config.pbtxt").write_text("max_batch_size: 32\ndynamic_batching { }\n")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def start(cmd: list[str], workdir: Path, tag: str, ready_flag: str = "--ready-file") -> tuple[subprocess.Popen, dict]:
    ready = workdir / f"{tag}.ready.json"
    with open(workdir / f"{tag}.log", "w") as log:  # the child writes to its own copy of the descriptor
        proc = subprocess.Popen(
            [*cmd, ready_flag, str(ready)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    t_end = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > t_end:
            proc.kill()
            raise SystemExit(f"{tag} failed to start:\n{(workdir / f'{tag}.log').read_text()}")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())


# -- the floor: a grpc.aio server that answers each message with its own bytes ----------------------------
async def echo_server(ready_file: Path) -> None:
    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server(options=CHANNEL_OPTS[:2])
    # no (de)serializers: bytes in, bytes out
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ready_file.write_text(json.dumps({"grpc_port": port, "pid": os.getpid()}))
    await server.wait_for_termination()


# -- requests ------------------------------------------------------------------------------------------
def infer_request(
    target: Target, x: np.ndarray | None, shm_in: tuple[str, int] | None = None, shm_out: tuple[str, int] | None = None
) -> bytes:
    req = pb.ModelInferRequest(model_name=target.model)
    t = req.inputs.add(name=target.input, datatype=target.datatype, shape=[1, *target.shape])
    if shm_in is not None:
        t.parameters["shared_memory_region"].string_param = shm_in[0]
        t.parameters["shared_memory_byte_size"].int64_param = shm_in[1]
    else:
        assert x is not None, "an input tensor or a shared-memory region"
        req.raw_input_contents.append(x.tobytes())
    if shm_out is not None:
        o = req.outputs.add(name=target.output)
        o.parameters["shared_memory_region"].string_param = shm_out[0]
        o.parameters["shared_memory_byte_size"].int64_param = shm_out[1]
    return req.SerializeToString()


class Driver:
    """`concurrency` loops, each on its own channel (connection), sending prepared request bytes."""

    def __init__(self, port: int, concurrency: int) -> None:
        self.channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTS) for _ in range(concurrency)
        ]
        self.requests: list[bytes] = [b""] * concurrency
        self.method = INFER

    async def run(self, seconds: float) -> tuple[float, list[float]]:
        calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            ch.unary_unary(self.method) for ch in self.channels
        ]  # bytes in, bytes out
        c = len(calls)
        return await drive(lambda i: calls[i % c](self.requests[i % c]), c, seconds)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


class ShmPlan:
    """Per connection: an input region (the tensor) and an output region, registered through that
    connection, i.e. with the worker that will serve it."""

    def __init__(self, target: Target, x: np.ndarray, concurrency: int) -> None:
        self.nbytes = x.nbytes
        self.out_nbytes = target.output_nbytes
        self.objects: list[shared_memory.SharedMemory] = []
        self.regions: list[tuple[str, ...]] = []  # (in name, in key, out name, out key)
        for _ in range(concurrency):
            tag = uuid.uuid4().hex[:10]
            names = []
            for kind in ("in", "out"):
                size = self.nbytes if kind == "in" else self.out_nbytes
                obj = shared_memory.SharedMemory(f"bench_{kind}_{tag}", create=True, size=size)
                self.objects.append(obj)
                if kind == "in":
                    assert obj.buf is not None  # None only once closed
                    obj.buf[: self.nbytes] = x.tobytes()
                names += [f"{kind}_{tag}", "/" + obj.name]
            self.regions.append(tuple(names))

    async def register(self, driver: Driver) -> None:
        for ch, (in_name, in_key, out_name, out_key) in zip(driver.channels, self.regions, strict=True):
            reg = ch.unary_unary(
                "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
                request_serializer=pb.SystemSharedMemoryRegisterRequest.SerializeToString,
                response_deserializer=pb.SystemSharedMemoryRegisterResponse.FromString,
            )
            await reg(pb.SystemSharedMemoryRegisterRequest(name=in_name, key=in_key, byte_size=self.nbytes))
            await reg(pb.SystemSharedMemoryRegisterRequest(name=out_name, key=out_key, byte_size=self.out_nbytes))

    def close(self) -> None:
        for obj in self.objects:
            obj.close()
            obj.unlink()


async def measure(port: int, pids: list[int], mode: str, target: Target, concurrency: int, seconds: float) -> dict:
    x = (np.random.default_rng(0).standard_normal([1, *target.shape]) * 50 + 100).astype(_NUMPY[target.datatype])
    driver = Driver(port, concurrency)
    plan = None
    if mode == "echo":
        driver.method = ECHO
        driver.requests = [infer_request(target, x)] * concurrency
    elif mode == "bytes":
        driver.requests = [infer_request(target, x)] * concurrency
    else:
        plan = ShmPlan(target, x, concurrency)
        await plan.register(driver)
        driver.requests = [
            infer_request(target, None, (r[0], x.nbytes), (r[2], target.output_nbytes)) for r in plan.regions
        ]
    try:
        await driver.run(min(1.0, seconds))  # warm: connections, sessions, allocator
        cpu0 = cpu_seconds(pids)
        rps, lat = await driver.run(seconds)
        cpu = cpu_seconds(pids) - cpu0
    finally:
        await driver.close()
        if plan is not None:
            plan.close()
    n = len(lat)
    return {"rps": rps, "p50_ms": pct(lat, 50) * 1e3, "cpu_us": cpu / max(1, n) * 1e6, "n": n}


def served_requests(metrics_port: int) -> float:
    """Successful inference requests so far, over every model and worker (the merged metrics view)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        # the parser names a counter's samples <family>_total even where the page has Triton's bare name
        if s.name in ("nv_inference_request_success", "nv_inference_request_success_total")
    )


def _cap_memory() -> None:
    # perf_analyzer keeps the responses of a measurement window in memory: with 600 KB outputs in the
    # response (the bytes path) it reached 21 GB here before the OOM killer stopped it.
    resource.setrlimit(resource.RLIMIT_AS, (PERF_ANALYZER_MEMORY, PERF_ANALYZER_MEMORY))


def perf_analyzer(
    command: list[str],
    port: int,
    metrics_port: int,
    pids: list[int],
    mode: str,
    target: Target,
    concurrency: int,
    seconds: float,
) -> dict:
    """Triton's C++ perf_analyzer as the driver (its client costs far less CPU than a Python one): its
    stable throughput, and the server's CPU per request over its whole run (from the served count)."""
    cmd = [
        *command,
        "-m",
        target.model,
        "-u",
        f"127.0.0.1:{port}",
        "-i",
        "grpc",
        "-b",
        "1",
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(int(seconds * 1000)),
        "--stability-percentage",
        "80",
        "--max-trials",
        "4",
    ]  # a shared machine is never within 10%
    if mode == "pa-shm":
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(target.output_nbytes)]
    served0, cpu0, t0 = served_requests(metrics_port), cpu_seconds(pids), time.perf_counter()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 12 + 60, preexec_fn=_cap_memory)
    except subprocess.TimeoutExpired:  # seen once here: perf_analyzer stalled on 600 KB tensors at load 11
        print(f"perf_analyzer: timed out on {target.label} {mode}", file=sys.stderr)
        return {
            "rps": float("nan"),
            "p50_ms": float("nan"),
            "cpu_us": float("nan"),
            "n": 0,
            "server_rps": float("nan"),
            "client_cpu_us": float("nan"),
        }
    served, cpu = served_requests(metrics_port) - served0, cpu_seconds(pids) - cpu0
    wall = time.perf_counter() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime  # perf_analyzer's own
    found = re.search(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec, latency (\d+) usec", res.stdout)
    if not found and "Failed to obtain stable measurement" in res.stdout + res.stderr:
        # no stable window (it exits 1 then): its figure is missing from this point; the server's CPU per
        # request and its own count are not
        print(f"perf_analyzer: no stable measurement for {target.label} {mode}", file=sys.stderr)
    elif res.returncode != 0:
        print(
            f"perf_analyzer failed with {res.returncode} ({' '.join(cmd)}):\n{res.stdout[-1000:]}\n"
            f"{res.stderr[-1000:]}",
            file=sys.stderr,
        )
        return {
            "rps": float("nan"),
            "p50_ms": float("nan"),
            "cpu_us": float("nan"),
            "n": 0,
            "server_rps": float("nan"),
            "client_cpu_us": float("nan"),
        }
    return {
        "rps": float(found.group(1)) if found else float("nan"),
        "p50_ms": float(found.group(2)) / 1e3 if found else float("nan"),
        "cpu_us": cpu / served * 1e6 if served else float("nan"),  # nothing counted: no figure, not CPU/1
        "n": int(served),
        "client_cpu_us": client_cpu / served * 1e6 if served else float("nan"),
        # what the server answered over perf_analyzer's whole run (its start-up included): a figure where
        # perf_analyzer found no stable window
        "server_rps": served / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="per point per round (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight, one per connection (default 8)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server worker counts (default 1 2)")
    ap.add_argument("--repository", type=Path, help="a repository holding --models (served beside the identities)")
    ap.add_argument("--models", nargs="*", default=[], help="models of --repository to measure too")
    ap.add_argument(
        "--perf-analyzer",
        nargs="+",
        metavar="CMD",
        help="also drive the identity models with this perf_analyzer command, e.g. "
        "'bash benchmarks/perf_analyzer.sh' (bytes and --shared-memory system)",
    )
    ap.add_argument("--echo-server", type=Path, help=argparse.SUPPRESS)  # internal: run the echo floor
    a = ap.parse_args()
    if a.echo_server:
        asyncio.run(echo_server(a.echo_server))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_frontend_"))
    repo = work / "repo"
    if a.models and a.repository is None:
        raise SystemExit("--models needs --repository")
    write_repository(repo, a.repository, a.models)
    targets = identity_targets() + [repository_target(repo, m) for m in a.models]
    procs: dict[str, tuple[subprocess.Popen, int, list[int]]] = {}
    metrics_ports: dict[str, int] = {}
    try:
        for w in a.workers:
            proc, info = start(
                [
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
                    "--log-level",
                    "warning",
                    "--workers",
                    str(w),
                ],
                work,
                f"server{w}",
            )
            pids = [proc.pid] + [x["pid"] for x in info.get("workers", [])]
            procs[f"w{w}"] = (proc, info["grpc_port"], pids)
            metrics_ports[f"w{w}"] = info["metrics_port"]
        proc, info = start([sys.executable, str(Path(__file__))], work, "echo", ready_flag="--echo-server")
        procs["echo"] = (proc, info["grpc_port"], [proc.pid])

        by_label = {t.label: t for t in targets}
        points = [(t.label, mode, f"w{w}") for t in targets for w in a.workers for mode in ("bytes", "shm")]
        points += [(t.label, "echo", "echo") for t in targets if t.label in SHAPES]  # the same bytes back
        if a.perf_analyzer:
            # pa-bytes only on the small tensor: on 600 KB ones perf_analyzer exhausts memory (_cap_memory)
            points += [
                (t.label, mode, f"w{w}")
                for t in targets
                if t.label in SHAPES
                for w in a.workers
                for mode in ("pa-bytes", "pa-shm")
                if mode == "pa-shm" or t.label == "mnist"
            ]
        acc: dict[tuple, list[dict]] = {p: [] for p in points}
        for r in range(a.rounds):
            order = points if r % 2 == 0 else points[::-1]
            for label, mode, srv in order:
                _, port, pids = procs[srv]
                if mode.startswith("pa-"):
                    res = perf_analyzer(
                        a.perf_analyzer, port, metrics_ports[srv], pids, mode, by_label[label], a.concurrency, a.seconds
                    )
                else:
                    res = asyncio.run(measure(port, pids, mode, by_label[label], a.concurrency, a.seconds))
                acc[(label, mode, srv)].append(res)
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
        for proc, _, _ in procs.values():
            proc.wait(60)

    def mean(p: tuple, k: str) -> float:
        return float(np.nanmean([x[k] for x in acc[p]])) if any(x[k] == x[k] for x in acc[p]) else float("nan")

    print(
        f"\nfrontend capacity, concurrency {a.concurrency} (one connection each), {a.rounds} x {a.seconds:g} s, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'model':<14}{'path':<10}{'server':<8}{'req/s':>9}{'p50 ms':>9}{'server CPU us/req':>19}")
    for p in points:
        label, mode, srv = p
        print(f"{label:<14}{mode:<10}{srv:<8}{mean(p, 'rps'):>9.0f}{mean(p, 'p50_ms'):>9.2f}{mean(p, 'cpu_us'):>19.0f}")
    print("\nratios")
    for w in a.workers:  # compact image tensors: the same picture as UINT8 pixels vs FP32
        u8, f32 = ("image_u8", "bytes", f"w{w}"), ("image", "bytes", f"w{w}")
        if u8 in acc and f32 in acc:
            print(
                f"  {w} worker(s), bytes path: UINT8 pixels / FP32 image req/s "
                f"{mean(u8, 'rps') / mean(f32, 'rps'):.2f}x, "
                f"CPU/req FP32 / UINT8 {mean(f32, 'cpu_us') / mean(u8, 'cpu_us'):.2f}x"
            )
    for shape in by_label:
        for w in a.workers:
            if (shape, "pa-bytes", f"w{w}") in acc and (shape, "pa-shm", f"w{w}") in acc:
                pb_, ps_ = (shape, "pa-bytes", f"w{w}"), (shape, "pa-shm", f"w{w}")
                print(
                    f"  {shape} {w} worker(s), perf_analyzer: shm/bytes req/s "
                    f"{mean(ps_, 'rps') / mean(pb_, 'rps'):.2f}x, CPU/req bytes/shm "
                    f"{mean(pb_, 'cpu_us') / mean(ps_, 'cpu_us'):.2f}x"
                )
            b, s = (shape, "bytes", f"w{w}"), (shape, "shm", f"w{w}")
            echo = (shape, "echo", "echo")
            over_echo = (
                f", bytes CPU/req over echo {mean(b, 'cpu_us') / mean(echo, 'cpu_us'):.2f}x" if echo in acc else ""
            )
            print(
                f"  {shape} {w} worker(s): shm/bytes req/s {mean(s, 'rps') / mean(b, 'rps'):.2f}x, "
                f"CPU/req bytes/shm {mean(b, 'cpu_us') / mean(s, 'cpu_us'):.2f}x{over_echo}"
            )
        if len(a.workers) > 1:
            w1, wn = a.workers[0], a.workers[-1]
            for mode in ("bytes", "shm", "pa-bytes", "pa-shm"):
                if (shape, mode, f"w{w1}") not in acc:
                    continue
                print(
                    f"  {shape} {mode}: {wn} workers / {w1} worker req/s "
                    f"{mean((shape, mode, f'w{wn}'), 'rps') / mean((shape, mode, f'w{w1}'), 'rps'):.2f}x"
                )


if __name__ == "__main__":
    main()
