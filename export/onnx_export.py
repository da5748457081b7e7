"""PyTorch module -> one checked ONNX file, with the dynamo exporter and a dynamic batch dimension."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from export.defaults import DEFAULT_OPSET
from models.registry import ModelEntry

BATCH_DIM_NAME = "batch"
INPUT_NAME = "input"


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph failed onnx.checker."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    seconds: float
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    size_bytes: int


def example_batch(entry: ModelEntry, n: int, seed: int) -> torch.Tensor:
    """A batch of n inputs: the entry's own sampler when it has one (detection wants images in range)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if entry.example_inputs is not None:
            return entry.example_inputs(n)
        return torch.randn(n, *entry.input_shape)
    finally:
        torch.random.set_rng_state(gen_state)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs torchvision-missing warnings and prints progress lines; keep the CLI readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# Node metadata the dynamo exporter writes with the building machine's absolute source paths.
BUILD_PATH_KEYS = ("pkg.torch.onnx.stack_trace",)


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def strip_build_paths(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` without the exporter's stack traces (absolute paths of the machine that built it, which
    made the artifact, and its hash, depend on where the checkout lives); None when it had none. The
    rest of the metadata (module names, fx nodes) carries no paths and stays."""
    removed = 0
    nodes = [n for g in _graphs(model.graph) for n in g.node] + [n for f in model.functions for n in f.node]
    for node in nodes:
        keep = [p for p in node.metadata_props if p.key not in BUILD_PATH_KEYS]
        if len(keep) != len(node.metadata_props):
            removed += len(node.metadata_props) - len(keep)
            saved = [(p.key, p.value) for p in keep]
            del node.metadata_props[:]
            for k, v in saved:
                node.metadata_props.add(key=k, value=v)
    return model if removed else None


def export_onnx(
    model: nn.Module,
    entry: ModelEntry,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    max_batch_size: int | None = None,
) -> ExportResult:
    """Export `model` (built from `entry`) to the single file `path` and run onnx.checker's full check."""
    if opset < 18:
        raise ExportError(f"opset {opset} < 18: the dynamo exporter and our TensorRT target need opset >= 18")
    path = Path(path)
    max_batch = max_batch_size or entry.max_batch_size
    # Trace at batch 2: torch.export specializes a dimension whose example size is 1, which would
    # silently make the batch static.
    example = example_batch(entry, 2, seed=0)
    batch = torch.export.Dim(BATCH_DIM_NAME, min=1, max=max(max_batch, 2))
    t0 = time.perf_counter()
    model = model.eval()
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(entry.output_names),
                dynamic_shapes=({0: batch},),
                external_data=False,
                custom_translation_table=entry.onnx_translation_table() if entry.onnx_translation_table else None,
                optimize=True,
                verify=False,
                report=False,
            )
    except Exception as exc:  # the exporter raises many types; name the model and keep the cause
        raise ExportError(f"{entry.name}: torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - t0
    if not path.is_file():
        raise ExportError(f"{entry.name}: exporter wrote no file at {path}")
    stray = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    if stray:
        raise ExportError(f"{entry.name}: exporter wrote external data {stray}; expected one file")

    stripped = strip_build_paths(onnx.load(str(path), load_external_data=False))
    if stripped:
        onnx.save(stripped, str(path))

    try:
        # full_check runs strict shape inference too; path-based so >2 GB models would still work
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{entry.name}: onnx.checker rejected the export: {exc}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    inputs = tuple(i.name for i in proto.graph.input)
    outputs = tuple(o.name for o in proto.graph.output)
    if inputs != (INPUT_NAME,):
        raise ExportError(f"{entry.name}: expected one graph input {INPUT_NAME!r}, got {list(inputs)}")
    if outputs != tuple(entry.output_names):
        raise ExportError(
            f"{entry.name}: graph outputs {list(outputs)} != registry output_names {list(entry.output_names)}"
        )
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise ExportError(f"{entry.name}: the batch dimension of {INPUT_NAME!r} is static ({batch_dim.dim_value})")
    return ExportResult(
        path=path, opset=opset, seconds=seconds, inputs=inputs, outputs=outputs, size_bytes=path.stat().st_size
    )
