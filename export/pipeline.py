"""One registry model -> a checked, staged repository entry: build, export, check, parity, lint.

Nothing here touches the model repository until every check has passed; `repository.write_models`
then swaps the results in. That ordering is what keeps a bad name, a missing checkpoint or a failed
parity from ever damaging a served repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime
import torch

from cnncore.artifacts import ONNX_FILENAME, file_sha256
from cnncore.spec import META_FILENAME, ModelMeta, Task
from export.batch_sizing import BatchPins
from export.eager_parity import DEFAULT_ATOL, DEFAULT_RTOL, ParityError, ParityReport, check_parity, default_batch_sizes
from export.onnx_export import DEFAULT_OPSET, ExportResult, example_batch, export_onnx
from export.progress import Step
from export.repository import LABELS_FILENAME, BatchingDefaults, StagedModel, build_config
from export.trt_lint import LintReport, TensorRTLintError, lint_model
from export.uint8_input import Uint8InputError, uint8_variant
from export.variants import VariantOptions, VariantRefused, select_variant
from models.registry import ModelEntry, get_entry, get_model


class ExportFailed(RuntimeError):
    """A one-line, user-facing reason the model could not be exported (the CLI prints it and exits 1)."""


@dataclass
class ExportOptions:
    weights: str = "default"  # "default" | "none" | a checkpoint path
    version: int = 1
    opset: int = DEFAULT_OPSET
    max_batch_size: int | None = None
    parity_batch_sizes: Sequence[int] | None = None
    atol: float = DEFAULT_ATOL
    rtol: float | None = None  # None: the entry's parity_rtol, else DEFAULT_RTOL
    lint: bool = True
    batching: BatchingDefaults = field(default_factory=BatchingDefaults)
    input_dtype: str = "fp32"  # "uint8": the graph takes pixels and normalizes them (export/uint8_input.py)
    # precision (fp32 / int8 / auto) and runtime (onnxruntime / openvino / auto) to serve
    variant: VariantOptions = field(default_factory=VariantOptions)


@dataclass
class ExportOutcome:
    staged: StagedModel
    export: ExportResult
    parity: ParityReport
    lint: LintReport


def _weights_arg(weights: str) -> str | Path | None:
    if weights == "default":
        return "default"
    if weights == "none":
        return None
    return Path(weights)


def _previous_metrics(repo: Path | None, name: str, weights: str) -> dict[str, float]:
    """Measured quality written by an evaluation run stays valid while the weights are the same."""
    if repo is None or not (repo / name / META_FILENAME).is_file():
        return {}
    try:
        old = ModelMeta.read(repo / name)
    except Exception:
        return {}
    return dict(old.metrics) if old.weights == weights else {}


def calibrate_batchnorm(model: torch.nn.Module, entry: ModelEntry, batch: int = 4) -> None:
    """Give a randomly initialised model BatchNorm statistics measured on random inputs.

    In eval mode a fresh BatchNorm (running mean 0, var 1) is the identity, so activations of a deep
    random network grow block after block: preact_resnet164 reaches 1e6, preact_resnet1001 overflows to
    NaN, and parity on NaN proves nothing. One pass over random inputs (per-channel statistics over
    batch x height x width positions) with only the BatchNorm layers in training mode (detection
    heads must stay in inference mode) keeps every layer's activations in range, so parity measures
    the exporter, not float overflow.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # plain average: the statistics of exactly this batch
        m.train()
    try:
        with torch.no_grad():
            model(example_batch(entry, batch, seed=10_000))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()


def export_model(
    name: str, workdir: Path, options: ExportOptions, *, repository: Path | None = None, step: Step | None = None
) -> ExportOutcome:
    """Run the whole pipeline for `name`, writing only under `workdir`; raise ExportFailed on any failure."""
    step = step or (lambda _desc: nullcontext())
    try:
        entry: ModelEntry = get_entry(name)
    except KeyError as exc:
        raise ExportFailed(str(exc.args[0])) from None
    max_batch = options.max_batch_size or entry.max_batch_size
    if max_batch < 1:
        raise ExportFailed(f"--max-batch-size must be >= 1, got {max_batch}")

    with step(f"{name}: build + load weights ({options.weights})"):
        weights = _weights_arg(options.weights)
        # a fixed seed makes "--weights none" exports reproducible (idempotent re-exports)
        torch.manual_seed(0)
        try:
            if weights == "default":
                if entry.weights is None:
                    raise ExportFailed(
                        f"{name}: has no trained weights; pass --weights none (random init) or --weights PATH"
                    )
                # get_model(name, "default") would drop the loader's description of its source, which
                # model.json records; this is the same build + strict load, keeping that string.
                model = entry.builder(**entry.builder_kwargs)
                weights_desc = str(entry.weights(model))
                model = model.eval()
            else:
                model = get_model(name, weights=weights)
                if weights is None:
                    calibrate_batchnorm(model, entry)
                weights_desc = (
                    "none (random initialisation, seed 0, BatchNorm statistics calibrated on random inputs)"
                    if weights is None
                    else f"checkpoint {Path(weights).name} sha256 {file_sha256(Path(weights))[:16]}"
                )
        except ExportFailed:
            raise
        except FileNotFoundError as exc:
            raise ExportFailed(f"{name}: {exc}") from None
        except (ValueError, RuntimeError, KeyError) as exc:  # state-dict key/shape mismatch, unreadable file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportFailed(f"{name}: cannot load weights {options.weights!r}: {first}") from None

    onnx_path = workdir / name / str(options.version) / ONNX_FILENAME
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with step(f"{name}: torch.onnx.export (dynamo, opset {options.opset})"):
        try:
            result = export_onnx(model, entry, onnx_path, opset=options.opset, max_batch_size=max_batch)
        except Exception as exc:
            raise ExportFailed(str(exc).splitlines()[0]) from None

    sizes = list(options.parity_batch_sizes) if options.parity_batch_sizes else default_batch_sizes(max_batch)
    with step(f"{name}: parity eager vs ONNX Runtime at batch {sizes}"):
        try:
            rtol = options.rtol if options.rtol is not None else (entry.parity_rtol or DEFAULT_RTOL)
            parity = check_parity(model, entry, onnx_path, batch_sizes=sizes, atol=options.atol, rtol=rtol)
        except ParityError as exc:
            raise ExportFailed(f"{name}: parity failed: {exc}") from None
        if not parity.ok:
            raise ExportFailed(parity.failure_message())

    with step(f"{name}: TensorRT lint"):
        proto = onnx.load(str(onnx_path))
        lint = lint_model(proto)
        if options.lint and not lint.ok:
            raise ExportFailed(f"{name}: {str(TensorRTLintError(lint)).replace(chr(10), ' ')}")

    labels = list(entry.labels()) if entry.labels is not None else None
    config = build_config(name, proto, max_batch, options.batching)
    extra: tuple[tuple[str, str], ...] = ()
    if labels and entry.task == Task.classification:
        # Triton's classification extension reads labels from the output's label_filename
        config.output[0].label_filename = LABELS_FILENAME
        extra = ((LABELS_FILENAME, "\n".join(labels) + "\n"),)
    meta = ModelMeta(
        name=name,
        task=entry.task,
        preprocess=entry.preprocess,
        labels=labels,
        input_name=result.inputs[0],
        description=entry.description,
        weights=weights_desc,
        metrics=_previous_metrics(repository, name, weights_desc),
    )
    parity_doc = {
        "model": name,
        "version": options.version,
        "onnx_sha256": file_sha256(onnx_path),
        "opset": result.opset,
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "parity": _rounded(parity.to_dict()),
        "tensorrt_lint": lint.to_dict(),
    }
    staged = StagedModel(
        name=name,
        version=options.version,
        onnx_path=onnx_path,
        config=config,
        meta=meta,
        parity=parity_doc,
        extra_files=extra,
    )
    try:
        staged = select_variant(
            staged,
            workdir,
            options.variant,
            step,
            previous=repository / name if repository is not None else None,
            batching=BatchPins(
                ceiling=max_batch,
                max_batch_size=options.max_batch_size,
                preferred=tuple(options.batching.preferred_batch_sizes),
                queue_delay_us=options.batching.max_queue_delay_microseconds,
            ),
        )
    except VariantRefused as exc:
        raise ExportFailed(str(exc)) from None
    if options.input_dtype == "uint8":
        try:
            staged = uint8_variant(staged, step)
        except Uint8InputError as exc:
            raise ExportFailed(str(exc)) from None
    return ExportOutcome(staged=staged, export=result, parity=parity, lint=lint)


def _rounded(obj):
    """Errors to 3 significant digits: last-bit noise between runs must not change parity.json."""
    if isinstance(obj, float):
        return float(f"{obj:.3g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj
