"""ONNX Runtime (CPU) vs PyTorch eager images/s per model at batch 1 and 8, in one run.

    python benchmarks/bench_models.py                       # mobilenet_v2 resnet18
    python benchmarks/bench_models.py resnet50 --batch-sizes 1 8 32 --seconds 5
    python benchmarks/bench_models.py mobilenet_v2 --repository model_repository   # reuse its ONNX

Both runtimes get the same thread count and the same input tensor; each measurement warms up first
and then runs for at least --seconds. Not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
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
from cnncore.artifacts import ONNX_FILENAME  # noqa: E402
from cnncore.layout import latest_version_dir  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.parity import ort_session  # noqa: E402
from models.registry import get_entry, get_model  # noqa: E402


def _rate(fn, batch: int, seconds: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            return n * batch / elapsed


def bench(name: str, batch_sizes: list[int], seconds: float, threads: int, repository: Path | None,
          workdir: Path) -> list[tuple[str, int, float, float]]:
    entry = get_entry(name)
    torch.manual_seed(0)
    try:
        model = get_model(name, weights="default" if entry.has_weights else None)
    except FileNotFoundError:  # trained checkpoint not fetched/trained yet: speed does not depend on values
        model = get_model(name, weights=None)
    try:
        onnx_path = latest_version_dir(repository / name) / ONNX_FILENAME if repository else None
    except FileNotFoundError:  # not in that repository (or no version yet): exported below
        onnx_path = None
    if onnx_path is None or not onnx_path.is_file():
        onnx_path = workdir / f"{name}.onnx"
        export_onnx(model, entry, onnx_path)
    session = ort_session(onnx_path, threads=threads)
    out_name = entry.output_names[0]
    rows = []
    for b in batch_sizes:
        x = torch.randn(b, *entry.input_shape)
        xn = np.ascontiguousarray(x.numpy())

        def eager() -> None:
            with torch.inference_mode():
                model(x)

        def onnxrt() -> None:
            session.run([out_name], {"input": xn})

        rows.append((name, b, _rate(onnxrt, b, seconds), _rate(eager, b, seconds)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["mobilenet_v2", "resnet18"], help="registry names")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timed run per measurement")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both runtimes")
    p.add_argument("--repository", type=Path, default=None, help="use <repo>/<model>/1/model.onnx when present")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    table = Table(title=f"images/s, CPU, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} "
                        f"(ONNX Runtime vs PyTorch {torch.__version__} eager)")
    for col in ("model", "batch", "ONNX Runtime img/s", "eager img/s", "ORT / eager"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            with console.status(f"{name}: export + measure"):
                for model, b, ort_rate, eager_rate in bench(name, args.batch_sizes, args.seconds, args.threads,
                                                            args.repository, Path(work)):
                    table.add_row(model, str(b), f"{ort_rate:.1f}", f"{eager_rate:.1f}", f"{ort_rate / eager_rate:.2f}x")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
