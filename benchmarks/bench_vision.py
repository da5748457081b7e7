"""Images/s through the vision API vs the tensor protocol vs in-process, in one run.

    .venv/bin/python benchmarks/bench_vision.py --repository model_repository [--model mobilenet_v2]

Three ways to classify the same JPEG photos (scikit-image's chelsea, coffee, astronaut, rocket):
  in-process   decode + preprocess (cnncore.imaging) + ONNX Runtime + top-k in this process, at batch 1
               and 8 (the better is the reference);
  Classify     JPEG bytes to the server's vision API, `--concurrency` requests in flight (1 image each);
  ModelInfer   already-preprocessed FP32 tensors to the server's inference protocol, same concurrency.
The server runs as a subprocess (as users run it) unless --url points at one. ONNX Runtime gets the
same intra-op thread count in both places. The goal: Classify costs <= 10% over in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from bench_server import model_file, pct, start_server  # noqa: E402  (same folder)
from client import AsyncInferenceClient, AsyncVisionClient, InferenceClient  # noqa: E402
from cnncore.imaging import prepare_image  # noqa: E402
from cnncore.postprocess import top_k  # noqa: E402
from cnncore.spec import ModelMeta  # noqa: E402
from server.backends.base import BackendOptions  # noqa: E402
from server.backends.ort_backend import OrtBackend  # noqa: E402


def sample_jpegs() -> list[bytes]:
    import skimage.data as data
    from PIL import Image

    out = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class InProcess:
    """decode + preprocess + ONNX Runtime + top-k in this process: the reference the server is held to.

    ONNX Runtime through the server's own backend class, so both sides run identically configured
    sessions (threads, spinning); this process never imports tritonclient, so that is safe here.
    """

    def __init__(self, repository: Path, model: str, jpegs: list[bytes], threads: int) -> None:
        self.meta = ModelMeta.read(repository / model)
        self.jpegs = jpegs
        self.backend = OrtBackend(
            model_file(repository, model), BackendOptions(intra_op_threads=threads, inter_op_threads=1)
        )
        self._next = 0
        self.run_batch(8)  # warm-up

    def run_batch(self, batch: int) -> None:
        n = len(self.jpegs)
        tensors = [prepare_image(self.jpegs[(self._next + k) % n], self.meta.preprocess).tensor for k in range(batch)]
        self._next += batch
        outputs = self.backend.execute({self.meta.input_name: np.stack(tensors)})
        for row in next(iter(outputs.values())):
            top_k(row, 5)

    def measure(self, batch: int, seconds: float) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.run_batch(batch)
            done += batch
        return done / (time.perf_counter() - start)


async def drive(call, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """`concurrency` loops calling `call(i)` for `seconds`; returns (requests/s, latencies in s)."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        n = w
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await call(n)
            latencies.append(time.perf_counter() - t)
            n += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies) / (time.perf_counter() - start), latencies


async def measure_all(
    url: str, model: str, local: InProcess, concurrency: int, seconds: float, rounds: int
) -> dict[str, list[tuple[float, list[float]]]]:
    """Every path once per round, interleaved, so a noisy neighbour slows all of them alike."""
    meta, jpegs = local.meta, local.jpegs
    tensors = [prepare_image(j, meta.preprocess).tensor[None] for j in jpegs]
    results: dict[str, list[tuple[float, list[float]]]] = {}
    async with AsyncVisionClient(url) as vision, AsyncInferenceClient(url) as infer:

        async def classify(n: int) -> None:
            response = await vision.classify(model, [jpegs[n % len(jpegs)]], top_k=5)
            assert not response.results[0].image.HasField("error")

        async def model_infer(n: int) -> None:
            await infer.infer(model, {meta.input_name: tensors[n % len(tensors)]})

        served = (("Classify (JPEG)", classify), ("ModelInfer (tensor)", model_infer))
        for _, call in served:
            await drive(call, concurrency, min(2.0, seconds))  # warm-up: sessions, connections, caches
        for r in range(rounds):
            for batch in (1, 8):
                name = f"in-process batch {batch}"
                results.setdefault(name, []).append((local.measure(batch, seconds), []))
            for name, call in served:
                results.setdefault(name, []).append(await drive(call, concurrency, seconds))
            print(
                f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1][0]:.1f}/s" for k, v in results.items()),
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, both sides")
    args = parser.parse_args()

    jpegs = sample_jpegs()
    local = InProcess(args.repository, args.model, jpegs, args.threads)
    print(
        f"model {args.model}, {len(jpegs)} JPEG photos ({', '.join(str(len(j) // 1024) + ' KiB' for j in jpegs)}), "
        f"concurrency {args.concurrency}, {args.rounds} rounds x {args.seconds:.0f} s, {args.threads} ORT threads"
    )

    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        url = args.url
        if url is None:
            proc, port = start_server(args.repository, [args.model], args.threads, False, Path(tmp))
            url = f"127.0.0.1:{port}"
        try:
            results = asyncio.run(measure_all(url, args.model, local, args.concurrency, args.seconds, args.rounds))
            with InferenceClient(url) as client:
                stats = client.get_inference_statistics(args.model).model_stats[0]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)

    rate: dict[str, float] = {}
    print(f"\n{'path':<24}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}   (median of rounds)")
    for name, runs in results.items():
        rate[name] = statistics.median(r for r, _ in runs)
        lat_ms = [x * 1000 for _, lat in runs for x in lat]
        if lat_ms:
            print(f"{name:<24}{rate[name]:>10.1f}{pct(lat_ms, 50):>9.1f}{pct(lat_ms, 99):>9.1f}")
        else:
            print(f"{name:<24}{rate[name]:>10.1f}")
    best = max(rate["in-process batch 1"], rate["in-process batch 8"])
    classify, tensor = rate["Classify (JPEG)"], rate["ModelInfer (tensor)"]
    print(
        f"\nserver executions: {stats.execution_count} for {stats.inference_count} images "
        f"(average batch {stats.inference_count / max(1, stats.execution_count):.1f})"
    )
    print(
        f"Classify / in-process (best batch) = {classify / best:.3f}  (cost of the image path: "
        f"{(best / classify - 1) * 100:+.1f}%; goal <= +10%)"
    )
    print(f"ModelInfer / in-process            = {tensor / best:.3f}")
    print(f"Classify / ModelInfer              = {classify / tensor:.3f}")


if __name__ == "__main__":
    main()
