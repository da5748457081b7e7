"""Transport cost: tritonclient.http (binary data) vs tritonclient.grpc, and TLS vs plaintext gRPC.

    .venv/bin/python benchmarks/bench_transport.py [--seconds 4] [--rounds 3] [--concurrency 8]
        [--repository DIR --models mobilenet_v2]

Two servers as users run them (`python -m server` subprocesses on loopback), on the same repository:
one plaintext (gRPC and REST), one with TLS on gRPC (a CA and certificates made for the run with
`cryptography`, tests/pki.py). The identity model on FP32 [3,224,224] (602 KB in and out: the transport
is all there is to measure) and any real models from `--repository`, served by both. Each mode, batch-1
requests from `--concurrency` loops of one asyncio client (tritonclient.grpc.aio, tritonclient.http.aio
with binary inputs and outputs), interleaved in short slices (`--seconds` each, `--rounds` of them) so
load that other jobs put on the machine drifts over all modes alike:
  grpc       plaintext gRPC
  http       REST with Triton's binary-data extension
  grpc-tls   gRPC over TLS
Prints requests/s, p50/p99 and the serving process's CPU time per request (user+system from /proc: what
the server itself spends, which other jobs on the machine do not change) and the client's (this
process's) per mode, and the ratios the
issue sets targets for, over all slices and as the median of the per-slice ratios (PASS/MISS on the
median), with the load average before and after:
  http / grpc       (target >= 0.95)
  grpc-tls / grpc   (target >= 0.9)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

# tests/conftest.py loads tritonclient's generated protos into a private descriptor pool on import;
# without that they clash with the project's (bench_frontend imports those) in this one process.
import conftest  # noqa: E402,F401

# isort: split
from bench_frontend import Target, cpu_seconds, identity_targets, repository_target, start, write_repository  # noqa: E402
from bench_server import pct  # noqa: E402
from bench_vision import drive  # noqa: E402
from pki import make_pki  # noqa: E402  (tests/pki.py: the throw-away CA the TLS tests use)

MODES = ("grpc", "http", "grpc-tls")
TARGETS = {"http/grpc": 0.95, "grpc-tls/grpc": 0.9}


async def measure(
    targets: list[Target], plain: dict, tls: dict, ca: Path, concurrency: int, seconds: float, rounds: int
) -> dict[tuple[str, str], list[tuple[float, list[float], float, float]]]:
    """(model, mode) -> per slice (requests/s, latencies, server CPU seconds per request)."""
    import tritonclient.grpc.aio as tga
    import tritonclient.http.aio as tha

    grpc_plain = tga.InferenceServerClient(f"127.0.0.1:{plain['grpc_port']}")
    grpc_tls = tga.InferenceServerClient(f"127.0.0.1:{tls['grpc_port']}", ssl=True, root_certificates=str(ca))
    http = tha.InferenceServerClient(f"127.0.0.1:{plain['http_port']}", conn_limit=concurrency)
    results: dict[tuple[str, str], list[tuple[float, list[float], float, float]]] = {}
    pid = {"grpc": plain["pid"], "http": plain["pid"], "grpc-tls": tls["pid"]}
    try:
        calls = {}
        for t in targets:
            x = np.random.default_rng(0).random((1, *t.shape), dtype=np.float32)
            gi = tga.InferInput(t.input, list(x.shape), "FP32")
            gi.set_data_from_numpy(x)
            hi = tha.InferInput(t.input, list(x.shape), "FP32")
            hi.set_data_from_numpy(x, binary_data=True)
            go = [tga.InferRequestedOutput(t.output)]
            ho = [tha.InferRequestedOutput(t.output, binary_data=True)]

            def grpc_call(client, t=t, gi=gi, go=go):
                async def call(n: int) -> None:
                    (await client.infer(t.model, [gi], outputs=go)).as_numpy(t.output)

                return call

            async def http_call(n: int, t=t, hi=hi, ho=ho) -> None:
                (await http.infer(t.model, [hi], outputs=ho)).as_numpy(t.output)

            calls[t.label] = {"grpc": grpc_call(grpc_plain), "http": http_call, "grpc-tls": grpc_call(grpc_tls)}
        for by_mode in calls.values():  # warm-up: connections, TLS handshakes, sessions
            for call in by_mode.values():
                await drive(call, concurrency, 1.0)
        for r in range(rounds):
            for label, by_mode in calls.items():
                for mode in MODES:
                    cpu0, client0 = cpu_seconds([pid[mode]]), time.process_time()
                    rps, lat = await drive(by_mode[mode], concurrency, seconds)
                    cpu = (cpu_seconds([pid[mode]]) - cpu0) / max(1, len(lat))
                    client = (time.process_time() - client0) / max(1, len(lat))  # this process: the client
                    results.setdefault((label, mode), []).append((rps, lat, cpu, client))
            if (r + 1) % max(1, rounds // 4) == 0 or r + 1 == rounds:
                print(
                    f"  slice {r + 1}/{rounds}: "
                    + ", ".join(f"{k[0]}/{k[1]} {v[-1][0]:.0f}/s" for k, v in results.items()),
                    flush=True,
                )
    finally:
        await grpc_plain.close()
        await grpc_tls.close()
        await http.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="one slice of one mode")
    ap.add_argument("--rounds", type=int, default=12, help="slices per mode")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repository", type=Path, help="a repository holding --models (served beside the identity model)")
    ap.add_argument("--models", nargs="*", default=[])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.models and args.repository is None:
        ap.error("--models needs --repository")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_transport_") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        write_repository(repo, args.repository, args.models)
        targets = [t for t in identity_targets() if t.label == "image"]
        targets += [repository_target(repo, m) for m in args.models]
        pki = make_pki(work / "pki")
        base = [
            sys.executable,
            "-m",
            "server",
            "--model-repository",
            str(repo),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-address",
            "127.0.0.1",
            "--http-port",
            "0",
            "--allow-metrics",
            "false",
            "--log-format",
            "text",
        ]
        tls_flags = [
            "--grpc-use-ssl",
            "--grpc-server-cert",
            str(pki.server_cert),
            "--grpc-server-key",
            str(pki.server_key),
        ]
        procs = []
        try:
            plain_proc, plain = start(base, work, "plain")
            procs.append(plain_proc)
            tls_proc, tls = start(base + tls_flags, work, "tls")
            procs.append(tls_proc)
            print(f"concurrency {args.concurrency}, {args.rounds} slices x {args.seconds:g} s per mode", flush=True)
            results = asyncio.run(
                measure(targets, plain, tls, pki.ca_cert, args.concurrency, args.seconds, args.rounds)
            )
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)

    summary: dict[str, dict] = {}
    print(
        f"\n{'model':<14}{'mode':<10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'server CPU ms/req':>19}{'client CPU ms/req':>19}"
    )
    for t in targets:
        row: dict = {}
        for mode in MODES:
            runs = results[(t.label, mode)]
            lat = [x for _, ls, _, _ in runs for x in ls]
            total_s = args.seconds * len(runs)
            row[mode] = {
                "rps": len(lat) / total_s,
                "p50_ms": pct(lat, 50) * 1e3,
                "p99_ms": pct(lat, 99) * 1e3,
                "server_cpu_ms": float(np.median([c for _, _, c, _ in runs])) * 1e3,
                "client_cpu_ms": float(np.median([c for _, _, _, c in runs])) * 1e3,
            }
            m = row[mode]
            print(
                f"{t.label:<14}{mode:<10}{m['rps']:>9.1f}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}"
                f"{m['server_cpu_ms']:>19.2f}{m['client_cpu_ms']:>19.2f}"
            )
        for name, mode in (("http/grpc", "http"), ("grpc-tls/grpc", "grpc-tls")):
            per_slice = [a[0] / b[0] for a, b in zip(results[(t.label, mode)], results[(t.label, "grpc")], strict=True)]
            row[name] = {
                "overall": row[mode]["rps"] / row["grpc"]["rps"],
                "median_slice": float(np.median(per_slice)),
                "slices": [round(x, 2) for x in per_slice],
            }
        summary[t.label] = row
    print(f"\n{os.cpu_count()} CPUs, load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (1-min average)")
    for label, row in summary.items():
        for name, target in TARGETS.items():
            r = row[name]
            print(
                f"{label}: {name} {r['overall']:.2f} over all slices, median slice {r['median_slice']:.2f} "
                f"(target >= {target}: {'PASS' if r['median_slice'] >= target else 'MISS'})"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "concurrency": args.concurrency,
                    "seconds": args.seconds,
                    "rounds": args.rounds,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "results": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
