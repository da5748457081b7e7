"""Triton's classification extension: an output asked for with `classification: N` in its parameters
(tritonclient's `InferRequestedOutput(name, class_count=N)`) is answered, instead of the tensor, as its N
highest-valued classes per batch entry, BYTES strings formatted as Triton's server formats them:

    "<value>:<index>[:<label>]"    e.g. "0.668000:285:Egyptian cat"

<value> as C++'s std::to_string writes it (six decimals for floating point, plain integers otherwise),
<index> the class's position in the entry's flattened output, <label> line <index> of the output's
`label_filename` (beside config.pbtxt; absent when the file has no such line or the output names none).
Ties keep the lower index first. The answer's shape is [batch, min(N, classes)] for a batching model,
[min(N, classes)] otherwise. Outputs that hold no numbers (BYTES, BOOL) are refused INVALID_ARGUMENT, as
Triton refuses them, and so is a count that is not a positive integer or is combined with shared memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnncore.datatypes import from_numpy
from protos import model_config_pb2 as mc
from server.dataplane.model import ServedModel
from server.errors import invalid

CLASSIFICATION = "classification"


def read_labels(config: mc.ModelConfig, model_dir: Path) -> dict[str, list[str]]:
    """Each output's labels from its label_filename; ValueError naming the file when it cannot be read."""
    labels: dict[str, list[str]] = {}
    for out in config.output:
        if not out.label_filename:
            continue
        path = model_dir / out.label_filename
        if Path(out.label_filename).is_absolute() or ".." in Path(out.label_filename).parts:
            raise ValueError(
                f"output '{out.name}': label_filename {out.label_filename!r} must name a file in the model directory"
            )
        try:
            labels[out.name] = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"output '{out.name}': label_filename {out.label_filename!r}: {exc}") from None
    return labels


def class_counts(outputs: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, int]:
    """The classification count asked for each requested output (those that ask), checked."""
    counts: dict[str, int] = {}
    for name, params in outputs:
        if CLASSIFICATION not in params:
            continue
        count = params[CLASSIFICATION]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise invalid(
                f"output '{name}': parameter '{CLASSIFICATION}' must be a positive integer "
                f"(the number of classes to return), got {count!r:.40}"
            )
        if "shared_memory_region" in params:
            raise invalid(f"output '{name}': '{CLASSIFICATION}' and a shared memory region cannot be combined")
        counts[name] = count
    return counts


def _value(v: np.generic) -> str:
    return f"{float(v):f}" if isinstance(v, np.floating) else str(int(v))


def top_classes(
    arr: np.ndarray, count: int, batched: bool, labels: list[str] | None = None, name: str = ""
) -> np.ndarray:
    """`arr`'s `count` highest classes per batch entry as Triton's "<value>:<index>[:<label>]" strings."""
    if arr.dtype.kind not in "iuf":
        raise invalid(
            f"class result not available for output '{name}' due to unsupported type '{from_numpy(arr.dtype)}'"
        )
    rows = arr.reshape(arr.shape[0], -1) if batched else arr.reshape(1, -1)
    k = min(count, rows.shape[1])
    # Descending by value, the lower index first among equals (a stable sort of the negated values).
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    labels = labels or []
    out = np.empty((rows.shape[0], k), dtype=object)
    for b in range(rows.shape[0]):
        for j, idx in enumerate(order[b]):
            text = f"{_value(rows[b, idx])}:{idx}"
            if idx < len(labels):
                text += f":{labels[idx]}"
            out[b, j] = text.encode()
    return out if batched else out.reshape(k)


def classify(model: ServedModel, results: dict[str, np.ndarray], counts: Mapping[str, int]) -> dict[str, np.ndarray]:
    """`results` with each output in `counts` replaced by its classification (the others as they are)."""
    if not counts:
        return results
    out = dict(results)
    for name, count in counts.items():
        out[name] = top_classes(results[name], count, model.max_batch_size > 0, model.labels.get(name), name)
    return out
