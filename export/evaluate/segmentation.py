"""Mean IoU of an exported segmenter on the held-out synthetic shapes set, through a serving runtime.

    python -m export.evaluate.segmentation --onnx PATH [--model shapes_segmenter_bilinear] [--n 200]
    python -m export.evaluate.segmentation --repository REPO --model NAME [--record] [--benchmark]

The held-out set, the server's pre/postprocessing and the metric are models/segmentation/evaluate.py's.
`--benchmark` adds the bare runner's images/s (no pre/postprocessing) at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from cnncore.runtime import throughput_by_batch
from export.evaluate.source import add_source_arguments, resolve_source, source_runner
from models.segmentation.evaluate import HELD_OUT_SEED, HELD_OUT_SIZE, evaluate_runner

BENCHMARK_SECONDS = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.evaluate.segmentation", description=__doc__.split("\n")[0])
    add_source_arguments(parser, "shapes_segmenter_bilinear")
    parser.add_argument("--n", type=int, default=HELD_OUT_SIZE, help="number of held-out images")
    parser.add_argument("--record", action="store_true", help="with --repository: store mIoU in model.json metrics")
    parser.add_argument("--benchmark", action="store_true", help="also time the bare runner at batch 1 and 8")
    args = parser.parse_args(argv)
    source = resolve_source(parser, args)
    run = source_runner(args, source.path)

    try:
        result = evaluate_runner(run, source.spec, source.labels, args.n)
    except ValueError as exc:
        parser.error(f"{source.path}: {exc}")
    print(
        f"{args.model}: {result['images']} held-out images (seed {HELD_OUT_SEED}), {args.runtime}, "
        f"{result['seconds']:.1f}s incl. pre/postprocessing"
    )
    for name, iou in result["iou"].items():
        print(f"  IoU {name:<12} {iou:.4f}")
    print(f"mean IoU {result['miou']:.4f}")
    if args.benchmark:
        spec = source.spec
        sample = np.random.default_rng(0).standard_normal((3 if spec.color == "RGB" else 1, *spec.input_size))
        for bs, rate in throughput_by_batch(run, sample.astype(np.float32), (1, 8), BENCHMARK_SECONDS).items():
            print(f"{args.runtime} CPU, batch {bs}: {rate:.1f} images/s")
    if args.record and source.meta is not None:
        source.meta.metrics["mIoU"] = round(result["miou"], 4)
        source.meta.write(args.repository / args.model)
        print(f"recorded mIoU in {args.repository / args.model / 'model.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
