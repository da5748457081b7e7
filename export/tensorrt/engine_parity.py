"""An engine against ONNX Runtime, with the ONNX export's own parity criterion (export/eager_parity.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnncore.engine_manifest import EngineRecord

# Parity (atol, rtol) against ONNX Runtime FP32 by engine precision, in export/eager_parity.py's criterion
# max|d| <= atol + rtol * max|ref|. INT8 is reported, not enforced: its error depends on calibration.
PARITY_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (1e-3, 2e-2), "int8": (float("inf"), 0.0)}


def parity_against_onnxruntime(
    backend, onnx_path: Path, batch_sizes: Sequence[int], atol: float, rtol: float, label: str, seed: int = 0
):
    """Any backend against ONNX Runtime (CPU, FP32) on the same random inputs, as the ONNX export's own
    parity report (export/eager_parity.py: scale-aware max |d| <= atol + rtol * max |ref|, per output and
    batch size)."""
    from export.eager_parity import OutputParity, ParityReport, _compare, ort_session

    session = ort_session(onnx_path)
    rng = np.random.default_rng(seed)
    results: list[OutputParity] = []
    for n in batch_sizes:
        feeds = {spec.name: rng.standard_normal((n, *spec.shape)).astype(spec.dtype) for spec in backend.inputs}
        got = backend.execute(feeds)
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        results.extend(_compare(ref, got[name], atol, rtol, n, name) for name, ref in want.items())
    return ParityReport(label, list(batch_sizes), atol, rtol, results, custom_check=False)


def engine_parity(version_dir: Path, record: EngineRecord, batch_sizes: Sequence[int] | None = None):
    """The engine against ONNX Runtime running the file it was built from, with tolerances by engine precision."""
    from cnncore.trt_runtime import EngineRunner
    from export.eager_parity import default_batch_sizes

    atol, rtol = PARITY_TOLERANCE[record.precision]
    engine = EngineRunner(Path(version_dir) / record.file)
    try:
        return parity_against_onnxruntime(
            engine,
            Path(version_dir) / record.onnx_file,
            list(batch_sizes or default_batch_sizes(record.max_batch or 1)),
            atol,
            rtol,
            f"{Path(version_dir).parent.name} ({record.precision} engine)",
        )
    finally:
        engine.close()
