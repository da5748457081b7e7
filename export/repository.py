"""The model repository writer: Triton's layout plus our model.json and parity.json.

    <repo>/<model>/config.pbtxt        Triton ModelConfig (text protobuf, via cnncore.config)
    <repo>/<model>/model.json          cnncore.spec.ModelMeta
    <repo>/<model>/parity.json         the export's parity + TensorRT lint report
    <repo>/<model>/<version>/model.onnx

Atomic per model: the new model directory is assembled in a hidden staging directory beside the
target (same filesystem), then swapped in with renames, so a reader (the server polling the
repository) sees either the old directory or the new one, never a half-written one. Other versions
already in the model directory are carried over (hard links, no copy of big files). POSIX has no
portable atomic directory exchange, so the swap is two renames; the gap between them is a few
microseconds and a crash there leaves `<model>` missing plus a `.old-<model>-*` directory to restore.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from cnncore.artifacts import ONNX_FILENAME
from cnncore.config import CONFIG_FILENAME, render_config
from cnncore.spec import META_FILENAME, ModelMeta
from protos.model_config_pb2 import DataType, ModelConfig, ModelInput, ModelInstanceGroup, ModelWarmup

PARITY_FILENAME = "parity.json"
LABELS_FILENAME = "labels.txt"

# ONNX element type -> Triton DataType name
_TRITON_TYPE: dict[int, str] = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.STRING: "TYPE_STRING",
}


@dataclass(frozen=True)
class BatchingDefaults:
    """dynamic_batching and instance_group defaults for a CPU server with 2 cores.

    One instance: ONNX Runtime already uses both cores inside one run, and a second concurrent run
    would only contend for them. A short queue delay lets concurrent requests meet in one batch while
    keeping a lone request's added latency far below a millisecond.
    """

    max_queue_delay_microseconds: int | None = None  # None: derived (DEFAULT_QUEUE_DELAY_US until measured)
    instance_count: int = 1
    preferred_batch_sizes: tuple[int, ...] = ()  # empty: derived from max_batch_size, then from the measured curve


DEFAULT_QUEUE_DELAY_US = 100
MIN_QUEUE_SIZE = 64


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 4 up to max_batch_size: sizes ONNX Runtime runs efficiently."""
    return [b for b in (4, 8, 16, 32, 64, 128) if b <= max_batch_size] or [max_batch_size]


def default_queue_size(max_batch_size: int, instance_count: int) -> int:
    """Requests a model may hold queued: two full batches per instance (one gathering while one
    executes), and never fewer than MIN_QUEUE_SIZE. Beyond it a burst is refused at once with
    RESOURCE_EXHAUSTED (clients retry) instead of growing the server's memory with requests it cannot
    run soon. The floor keeps the bound from following the measured batch sizes down: with
    max_batch_size 8 two batches would be 16, and perf_analyzer or a client pool at concurrency 32 would
    be refused although 64 queued 224x224 FP32 inputs hold under 40 MB."""
    return max(MIN_QUEUE_SIZE, 2 * max(1, max_batch_size) * max(1, instance_count))


def warmup_batch_sizes(max_batch_size: int, preferred: Sequence[int] = ()) -> list[int]:
    """Batch 1 (a lone request's path) and every preferred size the batch bound allows, else
    max_batch_size: the batches the batcher forms from single-item requests. OpenVINO keeps memory per
    batch shape it has run, so a server warmed at exactly these does not grow under load, and a size the
    batcher never forms is never warmed (export/batch_sizing.py measured both)."""
    sizes = {b for b in preferred if 0 < b <= max_batch_size} or {max(1, max_batch_size)}
    return sorted({1, *sizes})


def _tensor_dims(vi: onnx.ValueInfoProto, name: str) -> tuple[str, list[int]]:
    tt = vi.type.tensor_type
    if tt.elem_type not in _TRITON_TYPE:
        raise ValueError(f"tensor {vi.name!r} of {name}: element type {tt.elem_type} has no Triton data type")
    dims = list(tt.shape.dim)
    if not dims or not dims[0].dim_param:
        raise ValueError(f"tensor {vi.name!r} of {name}: first dimension is not a dynamic batch dimension")
    # Triton dims exclude the batch dimension; any other symbolic dimension is variable (-1)
    return _TRITON_TYPE[tt.elem_type], [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]


def build_config(
    name: str, model: onnx.ModelProto, max_batch_size: int, batching: BatchingDefaults = BatchingDefaults()
) -> ModelConfig:
    """The Triton ModelConfig for an exported ONNX graph (inputs/outputs read from the graph itself)."""
    cfg = ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=max_batch_size)
    initializers = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dtype, dims = _tensor_dims(vi, name)
        inp = cfg.input.add(name=vi.name, data_type=DataType.Value(dtype), dims=dims)
        if len(dims) == 3 and dims[0] in (1, 3):  # an image [C, H, W]: image clients read the layout from here
            inp.format = ModelInput.FORMAT_NCHW
    for vi in model.graph.output:
        dtype, dims = _tensor_dims(vi, name)
        cfg.output.add(name=vi.name, data_type=DataType.Value(dtype), dims=dims)
    sizes = list(batching.preferred_batch_sizes) or preferred_batch_sizes(max_batch_size)
    delay = batching.max_queue_delay_microseconds
    set_batching(
        cfg, max_batch_size, sizes, DEFAULT_QUEUE_DELAY_US if delay is None else delay, batching.instance_count
    )
    return cfg


def set_batching(
    cfg: ModelConfig,
    max_batch_size: int,
    preferred: Sequence[int],
    queue_delay_us: int,
    instance_count: int | None = None,
) -> None:
    """max_batch_size, dynamic_batching (preferred sizes, queue delay, queue bound) and the warm-up
    samples of `cfg` (`warmup_batch_sizes`), in place. `instance_count`: else the config's own."""
    count = instance_count if instance_count is not None else sum(max(1, g.count) for g in cfg.instance_group) or 1
    cfg.max_batch_size = max_batch_size
    db = cfg.dynamic_batching
    del db.preferred_batch_size[:]
    db.preferred_batch_size.extend(preferred)
    db.max_queue_delay_microseconds = queue_delay_us
    db.default_queue_policy.max_queue_size = default_queue_size(max_batch_size, count)
    if not cfg.instance_group:
        cfg.instance_group.add(count=count, kind=ModelInstanceGroup.KIND_CPU)
    del cfg.model_warmup[:]
    for batch in warmup_batch_sizes(max_batch_size, preferred):
        sample = cfg.model_warmup.add(name=f"random_batch_{batch}", batch_size=batch if max_batch_size else 0)
        for t in cfg.input:
            sample.inputs[t.name].CopyFrom(
                ModelWarmup.Input(data_type=t.data_type, dims=[d if d > 0 else 1 for d in t.dims], random_data=True)
            )


@dataclass(frozen=True)
class StagedModel:
    """Everything one model directory will hold; written by `write_models`."""

    name: str
    version: int
    onnx_path: Path
    config: ModelConfig
    meta: ModelMeta
    parity: dict
    extra_files: tuple[tuple[str, str], ...] = ()  # (filename, text) beside config.pbtxt, e.g. labels.txt
    # (filename, path) written into the version directory beside model.onnx: every gated variant
    # (export/variants.py); one that is the served file itself becomes a hard link to model.onnx
    variant_files: tuple[tuple[str, Path], ...] = ()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage(repo: Path, staged: StagedModel) -> Path:
    target = repo / staged.name
    tmp = Path(tempfile.mkdtemp(prefix=f".staging-{staged.name}-", dir=repo))
    try:
        _fill(tmp, target, staged)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _fill(tmp: Path, target: Path, staged: StagedModel) -> None:
    if target.is_dir():
        # carry over the other versions (and anything else the operator put there) as hard links
        for child in target.iterdir():
            if child.name == str(staged.version):
                continue
            if child.is_dir():
                shutil.copytree(child, tmp / child.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(child), str(tmp / child.name))
    vdir = tmp / str(staged.version)
    vdir.mkdir()
    shutil.copyfile(staged.onnx_path, vdir / ONNX_FILENAME)
    for fname, src in staged.variant_files:
        if Path(src) == Path(staged.onnx_path):
            _link_or_copy(str(vdir / ONNX_FILENAME), str(vdir / fname))
        else:
            shutil.copyfile(src, vdir / fname)
    for fname in (CONFIG_FILENAME, META_FILENAME, PARITY_FILENAME, *(f for f, _ in staged.extra_files)):
        (tmp / fname).unlink(missing_ok=True)  # hard links from the old dir: never write through them
    (tmp / CONFIG_FILENAME).write_text(render_config(staged.config))
    staged.meta.write(tmp)
    (tmp / PARITY_FILENAME).write_text(json.dumps(staged.parity, indent=2, sort_keys=True) + "\n")
    for fname, text in staged.extra_files:
        (tmp / fname).write_text(text)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a server running as another user must read it


def _swap(tmp: Path, target: Path) -> None:
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_models(repo: str | Path, models: Sequence[StagedModel]) -> list[Path]:
    """Write several model directories: all are staged first, then swapped in, so a failure while
    staging (disk full, a bad file) leaves every existing model directory untouched."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for m in models:
            staged.append((_stage(repo, m), repo / m.name))
    except BaseException:
        for tmp, _ in staged:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tmp, target in staged:
        _swap(tmp, target)
    return [t for _, t in staged]


def write_model(repo: str | Path, model: StagedModel) -> Path:
    return write_models(repo, [model])[0]
