"""`python -m export engine`: TensorRT engines for a repository's models (export/tensorrt/).

    python -m export engine --repository DIR [--precision fp16|fp32|int8] [--workspace-mib N]

Per model: parse the version's TensorRT source with TensorRT's ONNX parser (cnncore.engine_manifest's
tensorrt_source: the symmetric QDQ `model.int8.onnx` for INT8, the FP32 parent `model.fp32.onnx` for
FP32 / FP16, `model.onnx` where export kept no variants; a model served as INT8 gets an INT8 engine by
default), add one optimization profile derived from config.pbtxt (batch min 1, opt at the preferred
batch, max at max_batch_size), build with a timing cache shared by all builds on this GPU + TensorRT
(later builds skip kernel timing they already did), write `model.<sm>.trt<ver>.<precision>.plan` and
record it and its source in `engines.json` (cnncore/engine_manifest.py), then check the engine against
ONNX Runtime running the same source on the same inputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cnncore.engine_manifest import PRECISIONS
from export.tensorrt.errors import BuildError
from export.tensorrt.repository_engines import build_repository_engines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", required=True, type=Path, help="model repository written by export.py")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp16")
    ap.add_argument("--workspace-mib", type=int, default=2048, help="TensorRT workspace memory pool limit")
    ap.add_argument("--models", nargs="*", help="only these models (default: all in the repository)")
    ap.add_argument("--calibration-samples", type=int, default=256, help="int8: samples from <model>/calibration/")
    ap.add_argument("--skip-parity", action="store_true", help="do not compare engines against ONNX Runtime")
    ap.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep engines already built for this GPU, TensorRT, precision and ONNX (a cache)",
    )
    ap.add_argument(
        "--activate", action="store_true", help="switch each built model's config.pbtxt to backend tensorrt on KIND_GPU"
    )
    args = ap.parse_args(argv)
    try:
        built = build_repository_engines(
            args.repository,
            precision=args.precision,
            workspace_mib=args.workspace_mib,
            models=args.models,
            calibration_samples=args.calibration_samples,
            parity=not args.skip_parity,
            skip_existing=args.skip_existing,
            activate=args.activate,
        )
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, rec in built.items():
        print(f"{name}: {rec.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
