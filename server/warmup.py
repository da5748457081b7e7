"""Triton's `model_warmup`: sample requests every backend instance executes before its model is ready.

    model_warmup [{
      name: "batch_1"  batch_size: 1  count: 1
      inputs { key: "input" value { data_type: TYPE_FP32 dims: [3, 224, 224] random_data: true } }
    }]

Each sample gives every model input as `zero_data`, `random_data` or `input_data_file` (raw row-major
bytes, or the protocol's length-prefixed BYTES elements, read from `<model>/warmup/<file>`, as Triton).
`dims` exclude the batch dimension; a batching model gets `batch_size` (1 if 0) in front, a model
without batching needs batch_size 0. `count` executions per sample (0 means once, as Triton). Samples
are checked against the model's inputs before anything runs, so a mistake fails the load with a message
naming the sample and the input; the loader runs them while the model is LOADING, so readiness only
turns true once every instance has executed every sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncore.datatypes import from_config, to_numpy
from cnncore.wire import WireFormatError, deserialize_bytes
from protos import model_config_pb2 as mc
from server.backends.base import Backend

WARMUP_DIR = "warmup"


class WarmupError(ValueError):
    """A warm-up sample that does not fit the model, or whose execution failed."""


@dataclass(frozen=True)
class WarmupSample:
    name: str
    inputs: dict[str, np.ndarray]
    count: int


def _data(
    sample: str,
    name: str,
    spec: mc.ModelWarmup.Input,
    shape: tuple[int, ...],
    model_dir: Path,
    rng: np.random.Generator,
) -> np.ndarray:
    datatype = from_config(spec.data_type)
    dtype = to_numpy(datatype)
    which = spec.WhichOneof("input_data_type")
    n = math.prod(shape)
    if which == "input_data_file":
        path = model_dir / WARMUP_DIR / spec.input_data_file
        if Path(spec.input_data_file).is_absolute() or ".." in Path(spec.input_data_file).parts:
            raise WarmupError(
                f"warm-up sample '{sample}' input '{name}': input_data_file must name a file "
                f"inside {model_dir / WARMUP_DIR}, got {spec.input_data_file!r}"
            )
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise WarmupError(f"warm-up sample '{sample}' input '{name}': cannot read {path}: {exc.strerror}") from None
        if datatype == "BYTES":
            try:
                return deserialize_bytes(raw, n, name).reshape(shape)
            except WireFormatError as exc:
                raise WarmupError(f"warm-up sample '{sample}': {path}: {exc}") from None
        if len(raw) != n * dtype.itemsize:
            raise WarmupError(
                f"warm-up sample '{sample}' input '{name}': {path} holds {len(raw)} bytes; "
                f"{datatype} {list(shape)} needs {n * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    if datatype == "BYTES":
        arr = np.empty(n, dtype=np.object_)
        arr[:] = [b"" if which != "random_data" else bytes(rng.integers(97, 123, 8, dtype=np.uint8)) for _ in range(n)]
        return arr.reshape(shape)
    if which != "random_data":  # zero_data, or nothing chosen (Triton's default is zeros too)
        return np.zeros(shape, dtype)
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, min(np.iinfo(dtype).max, 127), shape, endpoint=True).astype(dtype)


def samples(cfg: mc.ModelConfig, model_dir: Path) -> list[WarmupSample]:
    """The config's warm-up samples as arrays, checked against its inputs; WarmupError names the fault."""
    inputs = {t.name: t for t in cfg.input}
    rng = np.random.default_rng(0)
    out = []
    for i, w in enumerate(cfg.model_warmup):
        sample = w.name or f"#{i}"
        if cfg.max_batch_size > 0:
            batch = w.batch_size or 1
            if batch > cfg.max_batch_size:
                raise WarmupError(
                    f"warm-up sample '{sample}': batch_size {batch} exceeds max_batch_size {cfg.max_batch_size}"
                )
            prefix: tuple[int, ...] = (batch,)
        else:
            if w.batch_size:
                raise WarmupError(
                    f"warm-up sample '{sample}': batch_size must be 0 for a model without "
                    f"batching (max_batch_size 0), got {w.batch_size}"
                )
            prefix = ()
        missing = sorted(set(inputs) - set(w.inputs))
        extra = sorted(set(w.inputs) - set(inputs))
        if missing or extra:
            raise WarmupError(
                f"warm-up sample '{sample}': inputs must be the model's {sorted(inputs)}; "
                f"missing {missing}, unknown {extra}"
            )
        arrays = {}
        for name, spec in w.inputs.items():
            model_in = inputs[name]
            if spec.data_type != model_in.data_type:
                raise WarmupError(
                    f"warm-up sample '{sample}' input '{name}': data_type "
                    f"{mc.DataType.Name(spec.data_type)}, the model's is "
                    f"{mc.DataType.Name(model_in.data_type)}"
                )
            dims = list(spec.dims)
            want = list(model_in.dims)
            if len(dims) != len(want) or any(d < 1 or (m != -1 and d != m) for d, m in zip(dims, want, strict=True)):
                raise WarmupError(
                    f"warm-up sample '{sample}' input '{name}': dims {dims} do not fit the "
                    f"model's {want} (positive sizes; -1 in the model accepts any)"
                )
            arrays[name] = _data(sample, name, spec, prefix + tuple(dims), model_dir, rng)
        out.append(WarmupSample(sample, arrays, max(1, w.count)))
    return out


def run(cfg: mc.ModelConfig, instances: list[Backend], model_dir: Path) -> int:
    """Blocking: every instance warms every sample `count` times (Backend.warm_up: on each of its infer
    requests where it holds several); returns the executions run."""
    todo = samples(cfg, model_dir)
    runs = 0
    for inst in instances:
        for s in todo:
            try:
                inst.check_inputs(s.inputs)
                for _ in range(s.count):
                    runs += inst.warm_up(s.inputs)
            except Exception as exc:  # the load fails with the reason; the server keeps serving the rest
                raise WarmupError(f"warm-up sample '{s.name}' failed: {exc}") from None
    return runs
