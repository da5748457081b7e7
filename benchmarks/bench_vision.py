"""Images/s through the vision API vs the tensor protocol vs in-process, in one run.

    .venv/bin/python benchmarks/bench_vision.py --repository model_repository [--model mobilenet_v2]

Three ways to classify the same JPEG photos (scikit-image's chelsea, coffee, astronaut, rocket):
  in-process   decode + preprocess (server.imaging) + ONNX Runtime + top-k in this process, at batch 1
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
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from client import AsyncInferenceClient, AsyncVisionClient, InferenceClient  # noqa: E402
from modelrepo.spec import ModelMeta  # noqa: E402
from server.imaging import prepare_image  # noqa: E402
from server.postprocess import top_k  # noqa: E402


def sample_jpegs() -> list[bytes]:
    import skimage.data as data
    from PIL import Image

    out = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def in_process(model_dir: Path, jpegs: list[bytes], batch: int, seconds: float, threads: int) -> float:
    meta = ModelMeta.read(model_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    done, i = 0, 0

    def one_batch() -> None:
        nonlocal i
        tensors = [prepare_image(jpegs[(i + k) % len(jpegs)], meta.preprocess).tensor for k in range(batch)]
        i += batch
        (logits,) = session.run(None, {meta.input_name: np.stack(tensors)})[:1]
        for row in logits:
            top_k(row, 5)

    one_batch()  # warm-up
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_batch()
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


async def through_server(url: str, model: str, meta: ModelMeta, jpegs: list[bytes], concurrency: int,
                         seconds: float) -> dict[str, tuple[float, list[float]]]:
    tensors = [prepare_image(j, meta.preprocess).tensor[None] for j in jpegs]
    results = {}
    async with AsyncVisionClient(url) as vision, AsyncInferenceClient(url) as infer:
        async def classify(n: int) -> None:
            response = await vision.classify(model, [jpegs[n % len(jpegs)]], top_k=5)
            assert not response.results[0].image.HasField("error")

        async def model_infer(n: int) -> None:
            await infer.infer(model, {meta.input_name: tensors[n % len(tensors)]})

        for name, call in (("Classify (JPEG)", classify), ("ModelInfer (tensor)", model_infer)):
            await drive(call, concurrency, min(2.0, seconds))  # warm-up: sessions, connections, caches
            results[name] = await drive(call, concurrency, seconds)
    return results


def start_server(repository: Path, model: str, threads: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    ready = workdir / "ready.json"
    cmd = [sys.executable, "-m", "server", "--model-repository", str(repository), "--grpc-address", "127.0.0.1",
           "--grpc-port", "0", "--metrics-address", "127.0.0.1", "--metrics-port", "0", "--ready-file", str(ready),
           "--intra-op-threads", str(threads), "--model-control-mode", "explicit", "--load-model", model,
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(workdir / "server.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start:\n{(workdir / 'server.log').read_text()}")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, both sides")
    args = parser.parse_args()

    model_dir = args.repository / args.model
    meta = ModelMeta.read(model_dir)
    jpegs = sample_jpegs()
    print(f"model {args.model}, {len(jpegs)} JPEG photos ({', '.join(str(len(j) // 1024) + ' KiB' for j in jpegs)}), "
          f"concurrency {args.concurrency}, {args.seconds:.0f} s per measurement, {args.threads} ORT threads")

    rows: dict[str, float] = {}
    for batch in (1, 8):
        rows[f"in-process batch {batch}"] = in_process(model_dir, jpegs, batch, args.seconds, args.threads)
        print(f"  in-process batch {batch}: {rows[f'in-process batch {batch}']:.1f} images/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        url = args.url
        if url is None:
            proc, url = start_server(args.repository, args.model, args.threads, Path(tmp))
        try:
            served = asyncio.run(through_server(url, args.model, meta, jpegs, args.concurrency, args.seconds))
            with InferenceClient(url) as client:
                stats = client.get_inference_statistics(args.model).model_stats[0]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)

    print(f"\n{'path':<24}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for name, value in rows.items():
        print(f"{name:<24}{value:>10.1f}{'':>9}{'':>9}")
    for name, (rate, lat) in served.items():
        lat_ms = sorted(x * 1000 for x in lat)
        p99 = lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))]
        print(f"{name:<24}{rate:>10.1f}{statistics.median(lat_ms):>9.1f}{p99:>9.1f}")
        rows[name] = rate
    best = max(rows["in-process batch 1"], rows["in-process batch 8"])
    classify, tensor = rows["Classify (JPEG)"], rows["ModelInfer (tensor)"]
    print(f"\nserver executions: {stats.execution_count} for {stats.inference_count} images "
          f"(average batch {stats.inference_count / max(1, stats.execution_count):.1f})")
    print(f"Classify / in-process (best batch) = {classify / best:.3f}  (cost of the image path: "
          f"{(best / classify - 1) * 100:+.1f}%; goal <= +10%)")
    print(f"ModelInfer / in-process            = {tensor / best:.3f}")
    print(f"Classify / ModelInfer              = {classify / tensor:.3f}")


if __name__ == "__main__":
    main()
