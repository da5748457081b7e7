"""Numeric parity: PyTorch eager vs ONNX Runtime (CPU) on fresh inputs at several batch sizes.

The criterion is scale-aware: an output passes when max|ort - torch| <= atol + rtol * max|torch|.
An elementwise relative error is reported too, but not used to fail: logits near zero make it explode
without meaning anything. Non-float outputs (labels, counts) must match exactly. A model entry with a
`parity_check` hook (detection: padded, permutation-prone outputs) gets its own comparison instead.

Hook contract: `entry.parity_check(torch_outputs, ort_outputs)` receives two dicts output name ->
numpy array (same batch) and returns a dict of JSON-able metrics; it fails the check by raising
(AssertionError or ValueError with a message) or by returning {"ok": False, ...}.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cnncore.runtime import OrtSettings
from cnncore.runtime import ort_session as _session
from export.defaults import DEFAULT_ATOL, DEFAULT_RTOL
from export.onnx_export import INPUT_NAME, example_batch
from models.registry import ModelEntry

if TYPE_CHECKING:
    import onnxruntime


class ParityError(AssertionError):
    """ONNX Runtime's outputs differ from PyTorch eager beyond the tolerance."""


@dataclass
class OutputParity:
    batch_size: int
    output: str
    max_abs: float
    max_rel: float  # max elementwise |d| / (|ref| + 1e-6), for information
    ref_scale: float  # max |torch output|
    tolerance: float  # atol + rtol * ref_scale
    ok: bool
    detail: dict = field(default_factory=dict)


@dataclass
class ParityReport:
    model: str
    batch_sizes: list[int]
    atol: float
    rtol: float
    results: list[OutputParity]
    custom_check: bool

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def worst(self) -> OutputParity:
        return max(self.results, key=lambda r: (not r.ok, r.max_abs / max(r.tolerance, 1e-30)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def failure_message(self) -> str:
        bad = [r for r in self.results if not r.ok]
        parts = []
        for r in bad[:4]:
            if r.detail.get("error"):
                parts.append(f"batch {r.batch_size} {r.output}: {r.detail['error']}")
            else:
                parts.append(f"batch {r.batch_size} {r.output}: max abs {r.max_abs:.3g} > tol {r.tolerance:.3g}")
        return f"{self.model}: parity PyTorch vs ONNX Runtime failed: " + "; ".join(parts)


def ort_session(path: str | Path, threads: int = 2) -> onnxruntime.InferenceSession:
    """The session parity runs on: the runtime layer's CPU defaults, onnxruntime logging errors only."""
    return _session(path, OrtSettings(intra_op_threads=threads, inter_op_threads=1, log_severity=3))


def torch_outputs(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Eager outputs as name -> numpy, flattening a tensor / tuple / dict result in the exporter's order."""
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        flat = [out]
    elif isinstance(out, dict):
        flat = list(out.values())
    else:
        flat = list(out)
    if len(flat) != len(names):
        raise ParityError(f"model returned {len(flat)} outputs but the entry names {len(names)}: {list(names)}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, flat, strict=True)}


def _failed(batch: int, name: str, error: str) -> OutputParity:
    """A comparison that cannot pass: infinite error, the reason in `detail`."""
    return OutputParity(batch, name, float("inf"), float("inf"), 0.0, 0.0, False, {"error": error})


def _compare(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float, batch: int, name: str) -> OutputParity:
    if ref.shape != got.shape:
        return _failed(batch, name, f"shape {got.shape} != eager {ref.shape}")
    if not np.issubdtype(ref.dtype, np.floating):
        mismatches = int(np.count_nonzero(ref != got))
        return OutputParity(
            batch, name, float(mismatches), 0.0, 0.0, 0.0, mismatches == 0, {"exact": True, "mismatches": mismatches}
        )
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    if not np.all(np.isfinite(ref64)):
        # NaN == NaN everywhere would "pass" while proving nothing about the exported graph
        return _failed(batch, name, "eager output is not finite (overflow?): parity would be meaningless")
    if not np.all(np.isfinite(got64)):
        return _failed(batch, name, "ONNX Runtime output is not finite where eager is")
    diff = np.abs(got64 - ref64)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref64).max()) if ref64.size else 0.0
    max_rel = float((diff / (np.abs(ref64) + 1e-6)).max()) if diff.size else 0.0
    tol = atol + rtol * scale
    return OutputParity(batch, name, max_abs, max_rel, scale, tol, max_abs <= tol)


def default_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, an odd size and the maximum: the shapes a dynamic batcher will actually send."""
    return sorted({1, 2, 3, max_batch_size})


def check_parity(
    model: nn.Module,
    entry: ModelEntry,
    onnx_path: str | Path,
    *,
    batch_sizes: Sequence[int] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    seed: int | None = None,
) -> ParityReport:
    """Compare eager and ONNX Runtime on fresh inputs (not the export's trace input).

    The seed defaults to one derived from the model name, so a re-export reproduces the same report
    (idempotent repositories) while different models see different data.
    """
    sizes = list(batch_sizes) if batch_sizes else default_batch_sizes(entry.max_batch_size)
    base_seed = zlib.crc32(entry.name.encode()) + 1 if seed is None else seed
    session = ort_session(onnx_path)
    names = list(entry.output_names)
    results: list[OutputParity] = []
    model = model.eval()
    for i, n in enumerate(sizes):
        x = example_batch(entry, n, seed=base_seed + i)
        ref = torch_outputs(model, x, names)
        got_list = session.run(names, {INPUT_NAME: x.numpy()})
        got = dict(zip(names, got_list, strict=True))
        if entry.parity_check is not None:
            try:
                detail = dict(entry.parity_check(ref, got) or {})
                ok = bool(detail.pop("ok", True))
            except (AssertionError, ValueError) as exc:
                detail, ok = {"error": str(exc)}, False
            detail = {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in detail.items()}
            # the hook's own "max_*" error figures (e.g. max_box_abs) summarise it in the report table
            errors = [float(v) for k, v in detail.items() if k.startswith("max_") and isinstance(v, (int, float))]
            results.append(
                OutputParity(
                    n, "custom check", max(errors, default=0.0), float(detail.get("max_rel", 0.0)), 0.0, 0.0, ok, detail
                )
            )
        else:
            results.extend(_compare(ref[k], got[k], atol, rtol, n, k) for k in names)
    return ParityReport(entry.name, sizes, atol, rtol, results, entry.parity_check is not None)
