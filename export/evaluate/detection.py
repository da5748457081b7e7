"""mAP@0.5 of an exported detector on the held-out synthetic shapes set, through a serving runtime.

    python -m export.evaluate.detection --onnx PATH [--model shapes_detector]
    python -m export.evaluate.detection --repository DIR --model shapes_detector [--runtime openvino]

The held-out set, the server's letterbox preprocessing and the metric are models/detection/evaluate.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from export.evaluate.source import add_source_arguments, resolve_source, source_runner
from models.detection.evaluate import HELDOUT_SIZE, evaluate_runner


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.evaluate.detection",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_source_arguments(parser, "shapes_detector")
    parser.add_argument("--n", type=int, default=HELDOUT_SIZE, help="held-out pictures")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)

    source = resolve_source(parser, args)
    labels = source.labels or []
    num_classes = len(labels) - 1  # labels[0] is "__background__"
    metrics = evaluate_runner(source_runner(args, source.path), source.spec, num_classes, args.n)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(
            f"{args.model}: mAP@0.5 = {metrics['mAP50']:.4f} on {args.n} held-out pictures ({source.path}, "
            f"{args.runtime})"
        )
        for c in range(1, num_classes + 1):
            if f"AP50_class{c}" in metrics:
                print(f"  {labels[c]:>12}: AP50 {metrics[f'AP50_class{c}']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
