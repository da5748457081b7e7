"""Benchmark: cold start to ready (process start -> every model loaded, warmed up, ServerReady), same run
with and without the configs' model_warmup, in interleaved rounds.

    .venv/bin/python benchmarks/bench_cold_start.py --repository model_repository [--rounds 3]

The repository is what `python -m export repository` writes (its configs carry the warm-up). The
no-warm-up side serves a copy whose configs have model_warmup removed (model files hard-linked). Prints
each round, the medians, the warm-up's share, and each model's warm-up time from the server's log.
Target: at most 5 s to ready for the default repository with warm-up.

The server's resident memory (VmRSS) once ready is printed per round; `--per-model-rss` also starts an
empty server and one server per model (`--model-control-mode explicit --load-model M`) and prints what
each model adds to the empty server's RSS (target: the whole repository at most 500 MiB). The first
round may compile where the repository's OpenVINO cache (<repository>/.cache) is still empty; later
rounds import the cached blobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def time_to_ready(repo: Path, work: Path, *only: str) -> tuple[float, dict[str, float], float]:
    ready = work / "ready.json"
    log = work / "server.log"
    ready.unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as logf:  # the server writes to its own copy of the descriptor
        proc = subprocess.Popen(
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
                "--metrics-address",
                "127.0.0.1",
                "--metrics-port",
                "0",
                "--allow-http",
                "false",
                "--ready-file",
                str(ready),
                "--strict-readiness",
                "true",
                *(
                    ["--model-control-mode", "explicit", *[a for m in only for a in ("--load-model", m)]]
                    if only
                    else []
                ),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        models = json.loads(ready.read_text())["models"]
        if any(state != "READY" for state in models.values()):
            raise SystemExit(f"not every model loaded: {models}")
        rss = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    warm = {}
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"model warmed up"' in line:
            rec = json.loads(line)
            warm[rec["model"]] = rec["ms"]
    return elapsed, warm, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-model-rss", action="store_true", help="also each model's RSS over an empty server")
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
            empty = time_to_ready(a.repository, Path(tmp), "none_such_model")[2]
            print(f"RSS once ready: empty server {empty:.0f} MiB; each model adds (with its warm-up):")
            for name in names:
                print(f"  {name}: {time_to_ready(a.repository, Path(tmp), name)[2] - empty:.0f} MiB", flush=True)
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
