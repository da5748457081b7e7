"""Which variant of an exported model to serve: FP32, BF16 or QDQ INT8, on ONNX Runtime or OpenVINO.

`select_variant` takes the parity-checked FP32 model the pipeline staged and, as the options ask:
quantizes it (export/quantize.py, calibrated on real data of the task) into the two INT8 files (the
symmetric one TensorRT and ONNX Runtime read, and OpenVINO's own), lints the symmetric graph for
TensorRT, measures the throughput of every candidate (precision x runtime; BF16 is the FP32 file on
OpenVINO with INFERENCE_PRECISION_HINT bf16) on this machine, gates every non-FP32 candidate
(export/accuracy_gate.py) on the runtime it would be served with, and serves the fastest that passes.
FP32 always qualifies. Pinned precision or runtime limits the candidates; a pinned variant that fails
the gate is refused (ExportFailed naming metric, values and threshold), an automatic one falls back and
records why. Every passing variant's file stays in the version directory with its measured speed and
the CPU it ran on (model.json's serving.variants / serving.cpu), so a server on a CPU with other flags
can serve the best of them for itself (server/variant_choice.py).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cnncore.artifacts import FP32_FILENAME, INT8_FILENAME, INT8_OPENVINO_FILENAME, ONNX_FILENAME, file_sha256
from cnncore.cpu import CpuInfo, current_cpu
from cnncore.spec import (
    GatedVariant,
    GateFigure,
    ModelMeta,
    ServingChoice,
    VariantPrecision,
    VariantRuntime,
    is_variant_precision,
    is_variant_runtime,
)
from export.accuracy_gate import GateRefused, GateThresholds, check, describe, run_gate
from export.batch_sizing import BatchPins, apply_sizing, measure_curve, size_batches
from export.progress import Step
from export.quantize import EXCLUDE_NODES, FAST_BIAS_CORRECTION_ONLY, QuantizationError, QuantizeResult, quantize_onnx
from export.repository import PARITY_FILENAME, StagedModel
from export.runtimes import Runner, RuntimeMissing, available_runtimes, throughput, variant_runner

MEASURE_BATCHES = (1, 8)
MEASURE_ROUNDS = 3
# The file each variant is served from (FP32_FILENAME, INT8_FILENAME, INT8_OPENVINO_FILENAME, imported above
# from cnncore.artifacts, where `export engine` reads them too) sits beside model.onnx, the served copy.
# CPU flags without which a variant measured slower than FP32 (issue 18's measurements: BF16 0.71x
# without AMX; INT8 needs VNNI dot products to beat FP32's FMA kernels).
NEEDS: dict[str, list[str]] = {"bf16": ["amx_bf16"], "int8": ["avx512_vnni"]}
# The flags that pick the kernels a variant's gate figures came from: served elsewhere only where they
# are the same (measured: OpenVINO's INT8 segmenters 0.910 / 0.909 mIoU with AMX, 0.746 / 0.189 without).
GATED_ON: dict[str, tuple[str, ...]] = {"bf16": ("avx512_bf16", "amx_bf16"), "int8": ("avx512_vnni", "amx_int8")}


class VariantRefused(RuntimeError):
    """The pinned variant cannot be served (no calibration data, lint, gate): a one-line reason."""


@dataclass(frozen=True)
class VariantOptions:
    precision: str = "fp32"  # auto | fp32 | bf16 | int8
    runtime: str = "onnxruntime"  # auto | onnxruntime | openvino
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    measure_seconds: float = 0.4  # per candidate and batch size, over MEASURE_ROUNDS rounds
    threads: int = 2
    remeasure: bool = False  # False: keep the previous export's choice while its FP32 parent is unchanged

    def recorded(self) -> dict:
        """What a choice depends on besides the FP32 parent, recorded in parity.json."""
        return {"precision": self.precision, "runtime": self.runtime, "thresholds": asdict(self.thresholds)}


def score(tp: dict[str, float], precision: str, runtime: str) -> float:
    """Geometric mean of the batch-1 and batch-8 throughput: a lone request's latency and a loaded
    server's throughput count alike."""
    vals = [tp[f"{precision}/{runtime}/b{b}"] for b in MEASURE_BATCHES]
    return math.exp(sum(math.log(max(v, 1e-9)) for v in vals) / len(vals))


def variant_file(precision: str, runtime: str) -> str:
    if precision == "int8":
        return INT8_OPENVINO_FILENAME if runtime == "openvino" else INT8_FILENAME
    return FP32_FILENAME  # FP32, and BF16 (the FP32 file, run in bfloat16 by OpenVINO)


def variant_parameters(precision: str, runtime: str) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": "bf16"} if precision == "bf16" else {}


def _config_for(staged: StagedModel, precision: str, runtime: str, gate: list[GateFigure]) -> None:
    cfg = staged.config
    cfg.backend = runtime
    # Triton names: onnxruntime_onnx for ONNX Runtime; its OpenVINO backend has no platform string and
    # reads the ONNX file when default_model_filename names it.
    cfg.platform = "onnxruntime_onnx" if runtime == "onnxruntime" else ""
    if runtime == "openvino":
        cfg.default_model_filename = ONNX_FILENAME
    cfg.parameters["precision"].string_value = precision.upper()
    if "INFERENCE_PRECISION_HINT" in cfg.parameters:
        del cfg.parameters["INFERENCE_PRECISION_HINT"]
    for k, v in variant_parameters(precision, runtime).items():
        cfg.parameters[k].string_value = v
    if gate:
        refused = "" if all(f.passed for f in gate) else f"{gate[0].variant.split('/')[0].upper() or 'INT8'} refused: "
        cfg.parameters["accuracy_gate"].string_value = refused + "; ".join(describe(f) for f in gate)
    elif "accuracy_gate" in cfg.parameters:
        del cfg.parameters["accuracy_gate"]


def _speed_sample(name: str, staged: StagedModel, calib):
    """One real input for the speed measurement (the content does not change the speed of these
    graphs, but the detector's NMS work does depend on it)."""
    import numpy as np

    from models.data.calibration import CalibrationDataMissing, calibration_inputs

    if calib is None:
        try:
            calib = calibration_inputs(name, staged.meta.preprocess)[0]
        except CalibrationDataMissing:
            dims = list(staged.config.input[0].dims)
            return np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    return calib[0]


def _served_figures(tp: dict[str, float], precision: str, runtime: str) -> dict[int, float]:
    """The variant measurement's figures (batch 1 and 8) of the served variant: points of its curve."""
    return {b: tp[f"{precision}/{runtime}/b{b}"] for b in MEASURE_BATCHES if f"{precision}/{runtime}/b{b}" in tp}


def sized(
    staged: StagedModel, pins: BatchPins, runner: Callable[[], Runner] | None, sample, known: dict[int, float]
) -> StagedModel:
    """`staged` with its config's batching from the served variant's curve (export/batch_sizing.py):
    the curve recorded in model.json where the served file is the one it was measured for (a kept
    choice), else measured now with `runner()` (None: not measurable, the config keeps its defaults)."""
    serving = staged.meta.serving
    old = serving.batching if serving is not None else None
    if old is not None and old.images_per_s and (runner is None or old.ceiling == pins.ceiling):
        curve = dict(old.images_per_s)
    elif runner is not None:
        curve = measure_curve(runner(), sample, pins.max_batch_size or pins.ceiling, known)
    else:
        return staged
    sizing = size_batches(curve, pins)
    apply_sizing(staged.config, sizing)
    meta = staged.meta
    if serving is not None:
        meta = meta.model_copy(update={"serving": serving.model_copy(update={"batching": sizing})})
    return replace(staged, meta=meta)


def _previous_choice(staged: StagedModel, previous: Path | None, options: VariantOptions) -> StagedModel | None:
    """The choice the repository already holds for this model, when nothing it depends on changed: the
    same FP32 parent (parity.json's onnx_sha256; the export is deterministic), the same options, and
    the served and kept files still the ones recorded. Keeps a re-export idempotent (measured speeds
    differ from run to run) and skips minutes of quantizing, measuring and gating; --remeasure
    measures again. A --input-dtype uint8 repository records the parent's hash (served.onnx_sha256)
    beside the pixel file's, and the kept variant files are those parents."""
    if previous is None or options.remeasure or not (previous / PARITY_FILENAME).is_file():
        return None
    try:
        old_meta = ModelMeta.read(previous)
        old = json.loads((previous / PARITY_FILENAME).read_text())
        served = old["served"]
        if (
            old_meta.serving is None
            or old.get("onnx_sha256") != staged.parity["onnx_sha256"]
            or served.get("options") != options.recorded()
        ):
            return None
        vdir = previous / str(old["version"])
        kept = dict(served.get("files", {}))
        parent = kept.get(variant_file(served["precision"], served["runtime"]))
        if parent is None or any(not (vdir / f).is_file() or file_sha256(vdir / f) != h for f, h in kept.items()):
            return None
    except Exception:  # an older or hand-edited repository: measure afresh
        return None
    serving = old_meta.serving
    files = {}
    for fname in kept:
        files[fname] = staged.onnx_path.with_name(fname)
        shutil.copyfile(vdir / fname, files[fname])
    onnx_path = files[variant_file(serving.precision, serving.runtime)]
    _config_for(staged, serving.precision, serving.runtime, serving.gate)
    parity = dict(staged.parity)
    for key in ("served", "quantization", "accuracy_gate", "throughput_images_per_s"):
        if key in old:
            parity[key] = old[key]
    return replace(
        staged,
        onnx_path=onnx_path,
        meta=staged.meta.model_copy(update={"serving": serving}),
        parity=parity,
        variant_files=tuple(sorted((f, p) for f, p in files.items())),
    )


def _unpathed(exc: Exception, path: Path) -> str:
    """The error without the export's temporary directory (model.json carries no build-machine paths)."""
    return str(exc).replace(f"{path}: ", "").replace(str(path.parent) + "/", "")


def _variant(precision: str, runtime: str) -> tuple[VariantPrecision, VariantRuntime]:
    """A candidate as model.json types it (candidates are built from those names only)."""
    if not (is_variant_precision(precision) and is_variant_runtime(runtime)):
        raise ValueError(f"not a servable variant: {precision}/{runtime}")
    return precision, runtime


def _candidates(name: str, options: VariantOptions, cpu: CpuInfo) -> tuple[list[str], list[str]]:
    """(precisions, runtimes) to consider: the pins, or everything this machine can run."""
    runtimes = available_runtimes() if options.runtime == "auto" else [options.runtime]
    if options.runtime == "openvino" and "openvino" not in available_runtimes():
        raise VariantRefused(f"{name}: --runtime openvino, but openvino is not installed (pip install openvino)")
    if options.precision != "auto":
        if options.precision == "bf16":
            if options.runtime not in ("auto", "openvino") or "openvino" not in runtimes:
                why = f"--runtime {options.runtime}" if options.runtime != "auto" else "openvino is not installed"
                raise VariantRefused(
                    f"{name}: --precision bf16 is served by OpenVINO (INFERENCE_PRECISION_HINT bf16); {why}"
                )
            if not cpu.computes_bf16():
                raise VariantRefused(
                    f"{name}: --precision bf16, but this CPU ({cpu.summary()}) has no BF16 "
                    "instructions: OpenVINO would run FP32 and call it BF16"
                )
            runtimes = ["openvino"]
        return [options.precision], runtimes
    precisions = ["fp32", "int8"]
    # BF16 only where the CPU computes in bfloat16 (else OpenVINO silently runs FP32); measured below
    if "openvino" in runtimes and cpu.computes_bf16():
        precisions.insert(1, "bf16")
    return precisions, runtimes


def select_variant(
    staged: StagedModel,
    workdir: Path,
    options: VariantOptions,
    step: Step | None = None,
    previous: Path | None = None,
    batching: BatchPins | None = None,
) -> StagedModel:
    """The staged model to write, with the chosen file, config, model.json and parity.json figures.
    `previous`: the model's directory in the target repository, whose choice is kept if still valid.
    `batching`: size the config's batching from the served variant's measured curve (None: keep it)."""
    from models.data.calibration import CalibrationDataMissing, calibration_inputs

    step = step or (lambda _d: nullcontext())
    kept = _previous_choice(staged, previous, options)
    if kept is not None:
        if batching is None or kept.meta.serving is None:
            return kept
        s = kept.meta.serving
        with step(f"{staged.name}: batch sizes of {s.precision}/{s.runtime} (kept, or measured if not recorded)"):
            return sized(
                kept,
                batching,
                lambda: variant_runner(kept.onnx_path, s.precision, s.runtime, options.threads),
                _speed_sample(staged.name, staged, None),
                _served_figures(s.throughput, s.precision, s.runtime),
            )
    name, meta = staged.name, staged.meta
    cpu = current_cpu()
    precisions, runtimes = _candidates(name, options, cpu)
    notes: list[str] = []
    fp32_file = staged.onnx_path.with_name(FP32_FILENAME)
    shutil.copyfile(staged.onnx_path, fp32_file)
    files: dict[str, Path] = {FP32_FILENAME: fp32_file}
    quant: QuantizeResult | None = None
    calib = None

    if "int8" in precisions:
        try:
            with step(f"{name}: INT8 calibration + quantization (QDQ, per-channel; TensorRT's and OpenVINO's files)"):
                calib, desc = calibration_inputs(name, meta.preprocess)
                quant = quantize_onnx(
                    fp32_file,
                    fp32_file.with_name(INT8_FILENAME),
                    calib,
                    description=desc,
                    exclude=EXCLUDE_NODES.get(name, ()),
                )
                files[INT8_FILENAME] = quant.path
                if "openvino" in runtimes:
                    try:
                        files[INT8_OPENVINO_FILENAME] = quantize_onnx(
                            fp32_file,
                            fp32_file.with_name(INT8_OPENVINO_FILENAME),
                            calib,
                            description=desc,
                            exclude=EXCLUDE_NODES.get(name, ()),
                            flavor="openvino",
                            full_bias_correction=name not in FAST_BIAS_CORRECTION_ONLY,
                        ).path
                    except QuantizationError as exc:  # OpenVINO's own file only: the other INT8 stays
                        notes.append(f"no INT8 for OpenVINO: {_unpathed(exc, fp32_file)}")
            import onnx

            from export.trt_lint import lint_model

            lint = lint_model(onnx.load(str(quant.path)))
            if not lint.ok:
                raise QuantizationError(f"TensorRT lint of the QDQ graph: {'; '.join(map(str, lint.issues[:3]))}")
        except (CalibrationDataMissing, QuantizationError) as exc:
            if options.precision == "int8":
                raise VariantRefused(f"{name}: cannot build INT8: {exc}") from None
            notes.append(f"no INT8: {_unpathed(exc, fp32_file)}")
            precisions = [p for p in precisions if p != "int8"]

    candidates = [
        (p, r) for p in precisions for r in runtimes if (p != "bf16" or r == "openvino") and variant_file(p, r) in files
    ]
    tp: dict[str, float] = {}
    # The sessions built for the speed measurement serve the accuracy gate too, rather than loading and
    # optimising the same file a second time and holding it in memory twice.
    runs: dict[tuple[str, str], Runner] = {}

    def session(p: str, r: str) -> Runner:
        if (p, r) not in runs:
            runs[(p, r)] = variant_runner(files[variant_file(p, r)], p, r, options.threads)
        return runs[(p, r)]

    if len(candidates) > 1:
        sample = _speed_sample(name, staged, calib)
        with step(
            f"{name}: throughput of {', '.join(f'{p}/{r}' for p, r in candidates)} at batch "
            f"{'/'.join(map(str, MEASURE_BATCHES))}"
        ):
            for p, r in candidates:
                try:
                    session(p, r)
                except RuntimeMissing:
                    continue
            # Interleaved rounds, best of each: other processes only ever slow a measurement down, so
            # the maximum is the figure least disturbed by a busy machine.
            for round_ in range(MEASURE_ROUNDS):
                for (p, r), run in runs.items():
                    for b in MEASURE_BATCHES:
                        key = f"{p}/{r}/b{b}"
                        rate = throughput(
                            run, sample, b, options.measure_seconds / MEASURE_ROUNDS, warmup=round_ == 0, min_runs=1
                        )
                        tp[key] = round(max(tp.get(key, 0.0), rate), 1)
        candidates = [c for c in candidates if f"{c[0]}/{c[1]}/b1" in tp]
        candidates.sort(key=lambda c: -score(tp, *c))

    # Every candidate faster than the fastest FP32 one is gated, each on its own runtime: the two
    # runtimes do not run the same INT8 graph alike (measured: the bilinear segmenter's INT8 mIoU was
    # 0.913 on ONNX Runtime and 0.742 on OpenVINO with the symmetric file). Those that pass stay in the
    # repository, fastest first, for a server on another CPU to choose from (server/variant_choice.py).
    gated: dict[str, list[GateFigure]] = {}
    passing: list[tuple[VariantPrecision, VariantRuntime]] = []
    refusals: list[str] = []
    first_fp32 = next((i for i, c in enumerate(candidates) if c[0] == "fp32"), len(candidates))
    for i, (p, r) in enumerate(candidates):
        if p == "fp32":
            passing.append(_variant(p, r))
            continue
        if i > first_fp32:  # slower than FP32 here: never chosen, not worth gating
            continue
        with step(f"{name}: accuracy gate, {p.upper()} on {r} vs FP32 parent"):
            try:
                figures = run_gate(
                    meta, session("fp32", "onnxruntime"), session(p, r), options.thresholds, variant=f"{p}/{r}"
                )
            except Exception as exc:  # an evaluator that cannot run is a refusal, never a pass
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise VariantRefused(f"{name}: accuracy gate could not run: {first}") from None
        gated[f"{p}/{r}"] = figures
        try:
            check(meta, figures)
        except GateRefused as exc:
            refusals.append(f"{exc} (on {r})")
            continue
        passing.append(_variant(p, r))
    if not passing:
        raise VariantRefused(
            refusals[0] if refusals else f"{name}: no variant to serve" + (f" ({'; '.join(notes)})" if notes else "")
        )
    chosen = passing[0]
    if refusals:
        notes.append(
            "refused by the accuracy gate: " + ", ".join(k for k, f in gated.items() if not all(x.passed for x in f))
        )
    if chosen[0] == "fp32" and quant is not None and not gated:
        notes.append("FP32 measured faster than INT8 here (INT8 not gated)")

    precision, runtime = chosen
    pinned = options.precision != "auto" or options.runtime != "auto"
    if len(candidates) > 1:
        why = f"fastest of {len(tp) // len(MEASURE_BATCHES)} measured variants that passes the gate"
        if pinned:
            why += " (within --precision/--runtime)"
    else:
        why = "pinned by --precision/--runtime" if pinned else "the only candidate on this machine"
    reason = "; ".join([why, *notes])
    gate = gated.get(f"{precision}/{runtime}") or next(iter(gated.values()), [])
    kept_files = {variant_file(p, r) for p, r in passing}
    if quant is not None:
        kept_files.add(INT8_FILENAME)  # the TensorRT-readable file `export engine` builds from, gated or not
    variants = [
        GatedVariant(
            precision=p,
            runtime=r,
            file=variant_file(p, r),
            parameters=variant_parameters(p, r),
            images_per_s=round(score(tp, p, r), 1) if f"{p}/{r}/b1" in tp else 0.0,
            needs=NEEDS.get(p, []),
            gated_on={f: cpu.has(f) for f in GATED_ON.get(p, ())},
        )
        for p, r in passing
    ]
    fp32_sha = staged.parity["onnx_sha256"]  # the pipeline hashed the FP32 parent already
    serving = ServingChoice(
        precision=precision,
        runtime=runtime,
        reason=reason,
        throughput=tp,
        gate=gate,
        calibration=quant.calibration if quant else "",
        fp32_onnx_sha256=fp32_sha if precision == "int8" else "",
        pinned=pinned,
        cpu=cpu,
        variants=variants,
    )
    _config_for(staged, precision, runtime, gate)
    parity = dict(staged.parity)
    served_path = files[variant_file(precision, runtime)]
    served_sha = fp32_sha if served_path == fp32_file else file_sha256(served_path)
    hashes = {f: (fp32_sha if f == FP32_FILENAME else file_sha256(files[f])) for f in sorted(kept_files)}
    parity["served"] = {
        "precision": precision,
        "runtime": runtime,
        "onnx_sha256": served_sha,
        "reason": reason,
        "options": options.recorded(),
        "files": hashes,
        "cpu": cpu.model_dump(mode="json"),
    }
    if quant is not None:
        parity["quantization"] = quant.to_dict()
    if gated:
        parity["accuracy_gate"] = {v: [f.model_dump(mode="json") for f in figs] for v, figs in gated.items()}
    if tp:
        parity["throughput_images_per_s"] = tp
    chosen_staged = replace(
        staged,
        onnx_path=served_path,
        meta=meta.model_copy(update={"serving": serving}),
        parity=parity,
        variant_files=tuple(sorted((f, files[f]) for f in kept_files)),
    )
    if batching is None:
        return chosen_staged
    with step(f"{name}: throughput of {precision}/{runtime} by batch size (config's batch sizes)"):
        return sized(
            chosen_staged,
            batching,
            lambda: session(precision, runtime),
            _speed_sample(name, staged, calib),
            _served_figures(tp, precision, runtime),
        )
