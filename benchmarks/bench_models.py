"""Raw images/s of each model's artifacts on the CPU runtimes, at batch 1 and 8, in one run:
ONNX Runtime FP32, ONNX Runtime INT8, OpenVINO FP32, OpenVINO INT8 (the same QDQ file for both), and
optionally PyTorch eager; every figure also as a ratio to ONNX Runtime FP32 measured in the same run.

    python benchmarks/bench_models.py                        # every default model + resnet18
    python benchmarks/bench_models.py mobilenet_v2 resnet18 --batch-sizes 1 8 32 --seconds 5
    python benchmarks/bench_models.py mobilenet_v2 --eager   # add PyTorch eager
    python benchmarks/bench_models.py --gate                 # and the accuracy gate's figures per runtime

The FP32 file is a fresh export of the registry entry; the INT8 file is export/quantize.py's QDQ model
calibrated on the task's real data (models/data/calibration.py), as `python -m export` builds it.
Every runtime gets the same thread count and the same real input; each measurement warms up first and
runs at least --seconds, split over 3 interleaved rounds (the best round counts). Not a test: numbers
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

# Spinning OpenMP workers (libgomp's default) collapse eager PyTorch on a shared or oversubscribed
# CPU: measured here, MobileNetV2 eager at 2 threads fell from 14 to 0.4 img/s. Passive waiting must be
# set before torch loads libgomp; an explicit OMP_WAIT_POLICY from the caller wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import models  # noqa: E402,F401
from export.onnx_export import export_onnx  # noqa: E402
from export.quantize import quantize_onnx  # noqa: E402
from export.runtimes import available_runtimes, runner, throughput  # noqa: E402
from models.data.calibration import calibration_inputs  # noqa: E402
from models.registry import get_entry, get_model, list_models  # noqa: E402

VARIANTS = ("ORT FP32", "ORT INT8", "OpenVINO FP32", "OpenVINO INT8")
ROUNDS = 3


def bench(
    name: str, batch_sizes: list[int], seconds: float, threads: int, workdir: Path, eager: bool, gate: list[str] | None
) -> dict[tuple[str, int], float]:
    entry = get_entry(name)
    torch.manual_seed(0)
    try:
        model = get_model(name, weights="default" if entry.has_weights else None)
    except FileNotFoundError:  # checkpoint not fetched: speed does not depend on the values
        model = get_model(name, weights=None)
    fp32 = workdir / f"{name}.onnx"
    export_onnx(model, entry, fp32)
    calib, _ = calibration_inputs(name, entry.preprocess)
    int8 = quantize_onnx(fp32, workdir / f"{name}.int8.onnx", calib).path
    sample = calib[0]
    files = {"FP32": fp32, "INT8": int8}
    if gate is not None:
        from cnncore.spec import ModelMeta
        from export.accuracy_gate import describe, run_gate

        meta = ModelMeta(
            name=name,
            task=entry.task,
            preprocess=entry.preprocess,
            labels=list(entry.labels()) if entry.labels else None,
        )
        for runtime in available_runtimes():
            try:
                figures = run_gate(meta, runner(fp32, "onnxruntime", threads), runner(int8, runtime, threads))
            except ValueError as exc:  # no gate metric for this task (e.g. resnet18 has one: agreement)
                gate.append(f"{name}: {exc}")
                break
            for f in figures:
                gate.append(f"{name} INT8 on {runtime}: {'pass' if f.passed else 'REFUSED'}: {describe(f)}")
    rates: dict[tuple[str, int], float] = {}
    runs = {
        f"{label} {precision}": runner(path, runtime, threads)
        for runtime, label in (("onnxruntime", "ORT"), ("openvino", "OpenVINO"))
        if runtime in available_runtimes()
        for precision, path in files.items()
    }
    # Interleaved rounds, best of each: a load that drifts during the run slows every variant alike,
    # and other processes only ever slow a measurement down.
    for r in range(ROUNDS):
        for variant, run in runs.items():
            for b in batch_sizes:
                rate = throughput(run, sample, b, seconds / ROUNDS, warmup=r == 0)
                rates[(variant, b)] = max(rates.get((variant, b), 0.0), rate)
    if eager:
        for b in batch_sizes:
            x = torch.from_numpy(np.repeat(sample[None], b, axis=0))

            def fn(x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    model(x)

            fn()
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds or n < 2:
                fn()
                n += 1
            rates[("eager FP32", b)] = n * b / elapsed
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=None, help="registry names (default: every default model + resnet18)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed run per measurement")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime")
    p.add_argument("--eager", action="store_true", help="also PyTorch eager")
    p.add_argument("--gate", action="store_true", help="also the accuracy gate's figures, INT8 on each runtime")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)  # NNCF's and torch.onnx's progress chatter
    names = args.models or [*list_models(served_by_default=True), "resnet18"]
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 150))
    variants = [*VARIANTS, *(["eager FP32"] if args.eager else [])]
    table = Table(
        title=f"images/s (x ONNX Runtime FP32), CPU, {args.threads} threads, batch "
        f"{'/'.join(map(str, args.batch_sizes))}"
    )
    table.add_column("model")
    table.add_column("batch", justify="right")
    for v in variants:
        table.add_column(v, justify="right")
    gate: list[str] | None = [] if args.gate else None
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            with console.status(f"{name}: export, quantize, measure"):
                rates = bench(name, args.batch_sizes, args.seconds, args.threads, Path(work), args.eager, gate)
            for b in args.batch_sizes:
                base = rates.get(("ORT FP32", b))
                cells = []
                for v in variants:
                    r = rates.get((v, b))
                    cells.append("-" if r is None else f"{r:.1f} ({r / base:.2f}x)" if base else f"{r:.1f}")
                table.add_row(name, str(b), *cells)
    console.print(table)
    for line in gate or []:
        console.print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
