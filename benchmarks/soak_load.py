"""Load for bench_cold_start's soak: gRPC clients (tritonclient aio) at a fixed concurrency against each
model in turn, batch-1 requests of random data shaped from the model's metadata.

    .venv/bin/python benchmarks/soak_load.py --url 127.0.0.1:8001 --seconds 60 --concurrency 8 [--models A B]

Runs in its own process: tritonclient's protos and the project's (bench_cold_start reads configs) must
not share one descriptor pool. Prints one line per model (`soak <model> <requests> <errors>`) as each
slice ends, so the caller can read the server's RSS between slices.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import numpy as np


async def _worker(client, name: str, inputs: list, stop: float) -> tuple[int, int]:
    from tritonclient.utils import InferenceServerException

    done = errors = 0
    while time.perf_counter() < stop:
        try:
            await client.infer(name, inputs)
            done += 1
        except InferenceServerException:
            errors += 1
    return done, errors


async def soak(url: str, models: list[str], seconds: float, concurrency: int) -> int:
    import tritonclient.grpc.aio as tca
    from tritonclient.grpc import InferInput
    from tritonclient.utils import triton_to_np_dtype

    rng = np.random.default_rng(0)
    failed = 0
    async with tca.InferenceServerClient(url) as client:
        if not models:
            index = await client.get_model_repository_index()
            models = sorted(m.name for m in index.models if m.state == "READY")
        per_model = seconds / max(1, len(models))
        for name in models:
            meta = await client.get_model_metadata(name)
            cfg = (await client.get_model_config(name)).config
            inputs = []
            for t in meta.inputs:
                shape = [1 if d < 0 else d for d in t.shape]
                if cfg.max_batch_size > 0:
                    shape[0] = 1
                dtype = triton_to_np_dtype(t.datatype)
                if np.issubdtype(dtype, np.floating):
                    data = rng.random(shape, dtype=np.float32).astype(dtype)
                else:
                    data = rng.integers(0, 127, shape).astype(dtype)
                inp = InferInput(t.name, shape, t.datatype)
                inp.set_data_from_numpy(data)
                inputs.append(inp)
            stop = time.perf_counter() + per_model
            counts = await asyncio.gather(*(_worker(client, name, inputs, stop) for _ in range(concurrency)))
            done, errors = sum(c[0] for c in counts), sum(c[1] for c in counts)
            failed += errors
            print(f"soak {name} {done} {errors}", flush=True)
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--models", nargs="*", default=[])
    a = ap.parse_args()
    failed = asyncio.run(soak(a.url, a.models, a.seconds, a.concurrency))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
