"""Which variant of an exported model to serve: FP32 or QDQ INT8, on ONNX Runtime or OpenVINO.

`select_variant` takes the parity-checked FP32 model the pipeline staged and, as the options ask:
quantizes it (export/quantize.py, calibrated on real data of the task), lints the QDQ graph for
TensorRT, measures the throughput of every candidate (precision x runtime) on this machine, and walks
the candidates fastest first: FP32 always qualifies, an INT8 one only if it passes the accuracy gate
(export/accuracy_gate.py) on the runtime it would be served with. Pinned precision or runtime limits
the candidates; a pinned INT8 that fails the gate is refused (ExportFailed naming metric, values and
threshold), an automatic one falls back to FP32 and records why. The choice and every figure go into
model.json (ModelMeta.serving), parity.json and the config's parameters.
"""
from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from cnncore.artifacts import ONNX_FILENAME, file_sha256
from cnncore.spec import GateFigure, ModelMeta, ServingChoice
from export.accuracy_gate import GateRefused, GateThresholds, check, describe, run_gate
from export.quantize import EXCLUDE_NODES, QuantizationError, QuantizeResult, quantize_onnx
from export.repository import PARITY_FILENAME, StagedModel
from export.runtimes import Runner, RuntimeMissing, available_runtimes, runner, throughput

MEASURE_BATCHES = (1, 8)
MEASURE_ROUNDS = 3


class VariantRefused(RuntimeError):
    """The pinned variant cannot be served (no calibration data, lint, gate): a one-line reason."""


@dataclass(frozen=True)
class VariantOptions:
    precision: str = "fp32"  # auto | fp32 | int8
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


def _config_for(staged: StagedModel, precision: str, runtime: str, gate: list[GateFigure]) -> None:
    cfg = staged.config
    cfg.backend = runtime
    # Triton names: onnxruntime_onnx for ONNX Runtime; its OpenVINO backend has no platform string and
    # reads the ONNX file when default_model_filename names it.
    cfg.platform = "onnxruntime_onnx" if runtime == "onnxruntime" else ""
    if runtime == "openvino":
        cfg.default_model_filename = ONNX_FILENAME
    cfg.parameters["precision"].string_value = precision.upper()
    if gate:
        refused = "" if all(f.passed for f in gate) else "INT8 refused: "
        cfg.parameters["accuracy_gate"].string_value = refused + "; ".join(describe(f) for f in gate)


def _speed_sample(name: str, staged: StagedModel, calib):  # type: ignore[no-untyped-def]
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


def _previous_choice(staged: StagedModel, previous: Path | None, options: VariantOptions) -> StagedModel | None:
    """The choice the repository already holds for this model, when nothing it depends on changed: the
    same FP32 parent (parity.json's onnx_sha256; the export is deterministic), the same options, and
    the served file still the one recorded. Keeps a re-export idempotent (measured speeds differ from
    run to run) and skips minutes of quantizing, measuring and gating; --remeasure measures again."""
    if previous is None or options.remeasure or not (previous / PARITY_FILENAME).is_file():
        return None
    try:
        old_meta = ModelMeta.read(previous)
        old = json.loads((previous / PARITY_FILENAME).read_text())
        served = old["served"]
        if (old_meta.serving is None or old.get("onnx_sha256") != staged.parity["onnx_sha256"]
                or served.get("options") != options.recorded()):
            return None
        served_file = previous / str(old["version"]) / ONNX_FILENAME
        if not served_file.is_file() or file_sha256(served_file) != served["onnx_sha256"]:
            return None
    except Exception:  # an older or hand-edited repository: measure afresh
        return None
    serving = old_meta.serving
    onnx_path = staged.onnx_path
    if serving.precision == "int8":
        onnx_path = staged.onnx_path.with_name("model.int8.onnx")
        shutil.copyfile(served_file, onnx_path)
    _config_for(staged, serving.precision, serving.runtime, serving.gate)
    parity = dict(staged.parity)
    for key in ("served", "quantization", "accuracy_gate", "throughput_images_per_s"):
        if key in old:
            parity[key] = old[key]
    return replace(staged, onnx_path=onnx_path, meta=staged.meta.model_copy(update={"serving": serving}),
                   parity=parity)


def select_variant(staged: StagedModel, workdir: Path, options: VariantOptions,
                   step: Callable[[str], object] | None = None, previous: Path | None = None) -> StagedModel:
    """The staged model to write, with the chosen file, config, model.json and parity.json figures.
    `previous`: the model's directory in the target repository, whose choice is kept if still valid."""
    from models.data.calibration import CalibrationDataMissing, calibration_inputs

    step = step or (lambda _d: nullcontext())
    kept = _previous_choice(staged, previous, options)
    if kept is not None:
        return kept
    name, meta = staged.name, staged.meta
    precisions = ["fp32", "int8"] if options.precision == "auto" else [options.precision]
    runtimes = available_runtimes() if options.runtime == "auto" else [options.runtime]
    if options.runtime == "openvino" and "openvino" not in available_runtimes():
        raise VariantRefused(f"{name}: --runtime openvino, but openvino is not installed (pip install openvino)")
    notes: list[str] = []
    files = {"fp32": staged.onnx_path}
    quant: QuantizeResult | None = None
    calib = None

    if "int8" in precisions:
        try:
            with step(f"{name}: INT8 calibration + quantization (QDQ, per-channel)"):
                calib, desc = calibration_inputs(name, meta.preprocess)
                quant = quantize_onnx(staged.onnx_path, staged.onnx_path.with_name("model.int8.onnx"), calib,
                                      description=desc, exclude=EXCLUDE_NODES.get(name, ()))
            files["int8"] = quant.path
            import onnx

            from export.trt_lint import lint_model

            lint = lint_model(onnx.load(str(quant.path)))
            if not lint.ok:
                raise QuantizationError(f"TensorRT lint of the QDQ graph: {'; '.join(map(str, lint.issues[:3]))}")
        except (CalibrationDataMissing, QuantizationError) as exc:
            if options.precision == "int8":
                raise VariantRefused(f"{name}: cannot build INT8: {exc}") from None
            notes.append(f"no INT8: {exc}")
            precisions = ["fp32"]

    candidates = [(p, r) for p in precisions for r in runtimes]
    tp: dict[str, float] = {}
    # The sessions built for the speed measurement serve the accuracy gate too, rather than loading and
    # optimising the same file a second time and holding it in memory twice.
    runs: dict[tuple[str, str], Runner] = {}

    def session(p: str, r: str) -> Runner:
        if (p, r) not in runs:
            runs[(p, r)] = runner(files[p], r, options.threads)
        return runs[(p, r)]

    if len(candidates) > 1:
        sample = _speed_sample(name, staged, calib)
        with step(f"{name}: throughput of {', '.join(f'{p}/{r}' for p, r in candidates)} at batch "
                  f"{'/'.join(map(str, MEASURE_BATCHES))}"):
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
                        rate = throughput(run, sample, b, options.measure_seconds / MEASURE_ROUNDS,
                                          warmup=round_ == 0, min_runs=1)
                        tp[key] = round(max(tp.get(key, 0.0), rate), 1)
        candidates = [c for c in candidates if f"{c[0]}/{c[1]}/b1" in tp]
        candidates.sort(key=lambda c: -score(tp, *c))

    # Fastest first. FP32 always qualifies; each INT8 candidate is gated on its own runtime: the two
    # runtimes do not run the same INT8 graph alike (measured: the bilinear segmenter's INT8 mIoU is
    # 0.913 on ONNX Runtime and 0.742 on OpenVINO, the transposed one's 0.908 and 0.172).
    chosen: tuple[str, str] | None = None
    gate: list[GateFigure] = []
    refusals: list[str] = []
    gated: dict[str, list[GateFigure]] = {}
    for p, r in candidates:
        if p == "fp32":
            chosen = (p, r)
            break
        with step(f"{name}: accuracy gate, INT8 on {r} vs FP32 parent"):
            try:
                figures = run_gate(meta, session("fp32", "onnxruntime"), session("int8", r), options.thresholds)
            except Exception as exc:  # an evaluator that cannot run is a refusal, never a pass
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise VariantRefused(f"{name}: accuracy gate could not run: {first}") from None
        gated[r] = figures
        try:
            check(meta, figures)
        except GateRefused as exc:
            refusals.append(f"{exc} (on {r})")
            gate = gate or figures
            continue
        chosen, gate = (p, r), figures
        break
    if chosen is None:
        raise VariantRefused(refusals[0] if refusals else f"{name}: no variant to serve")
    if refusals:
        notes.append("INT8 refused by the accuracy gate on " + ", ".join(x.rsplit("(on ", 1)[1][:-1] for x in refusals))
    if chosen[0] == "fp32" and quant is not None and not gate:
        notes.append("FP32 measured faster than INT8 here (INT8 not gated)")

    precision, runtime = chosen
    if len(candidates) > 1:
        why = f"fastest of {len(tp) // len(MEASURE_BATCHES)} measured variants that passes the gate"
    else:
        why = "pinned by --precision/--runtime"
    reason = "; ".join([why, *notes])
    fp32_sha = staged.parity["onnx_sha256"]  # the pipeline hashed the FP32 parent already
    serving = ServingChoice(precision=precision, runtime=runtime, reason=reason, throughput=tp, gate=gate,
                            calibration=quant.calibration if quant else "",
                            fp32_onnx_sha256=fp32_sha if precision == "int8" else "")
    _config_for(staged, precision, runtime, gate)
    parity = dict(staged.parity)
    served_sha = fp32_sha if precision == "fp32" else file_sha256(files[precision])
    parity["served"] = {"precision": precision, "runtime": runtime, "onnx_sha256": served_sha,
                        "reason": reason, "options": options.recorded()}
    if quant is not None:
        parity["quantization"] = quant.to_dict()
    if gated:
        parity["accuracy_gate"] = {rt: [f.model_dump(mode="json") for f in figs] for rt, figs in gated.items()}
    if tp:
        parity["throughput_images_per_s"] = tp
    return replace(staged, onnx_path=files[precision], meta=meta.model_copy(update={"serving": serving}),
                   parity=parity)
