"""What a served model needs besides its graph: task, labels and the preprocessing that feeds it.

`export` writes one `model.json` per model directory (next to `config.pbtxt`); the server reads it so
that image clients never repeat preprocessing. pydantic validates both sides of that file.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Literal, TypeGuard, get_args

from pydantic import BaseModel, ConfigDict, Field

from cnncore.cpu import CpuInfo

META_FILENAME = "model.json"


class Task(StrEnum):
    classification = "classification"
    detection = "detection"
    segmentation = "segmentation"
    autoencoder = "autoencoder"  # image in, (latent, reconstruction) out
    encoder = "encoder"  # image in, latent vector out


class PreprocessSpec(BaseModel):
    """How an encoded image becomes the model's input tensor.

    Pipeline: decode -> convert to `color` -> resize per `resize` -> (center crop) -> scale to [0,1]
    -> (x - mean) / std -> CHW float32. `letterbox` keeps aspect ratio and pads (detection), so boxes
    map back to the original pixels with one scale and offset.
    """

    model_config = ConfigDict(extra="forbid")

    input_size: tuple[int, int] = Field(description="(height, width) of the model input")
    color: Literal["RGB", "L"] = "RGB"
    resize: Literal["shorter_side_then_center_crop", "stretch", "letterbox"] = "stretch"
    resize_shorter_side: int | None = Field(
        default=None, description="for shorter_side_then_center_crop: shorter side before the crop (256 for 224)"
    )
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    pad_value: float = Field(default=0.0, description="letterbox fill, in [0,1] pixel units before normalization")
    invert: bool = Field(default=False, description="1 - x after scaling (Fashion-MNIST is light-on-dark)")


class GateFigure(BaseModel):
    """One accuracy-gate measurement: the task's metric for a candidate (INT8 or BF16; the field keeps
    its historical name `int8`) beside its FP32 parent."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    fp32: float
    int8: float
    rule: Literal["drop", "relative_increase", "at_least", "at_most"] = Field(
        description="drop: fp32 - int8 <= threshold (higher is better); relative_increase: "
        "int8 <= fp32 * (1 + threshold) (lower is better); at_least / at_most: the candidate's "
        "value against the threshold alone (fp32 then holds FP32's own reference figure)"
    )
    threshold: float
    held_out: str = ""
    passed: bool = True
    variant: str = Field(default="", description="the candidate measured, '<precision>/<runtime>'")


# The variants `export` can serve (a precision on a runtime), as model.json names them.
VariantPrecision = Literal["fp32", "bf16", "int8"]
VariantRuntime = Literal["onnxruntime", "openvino"]


def is_variant_precision(value: str) -> TypeGuard[VariantPrecision]:
    return value in get_args(VariantPrecision)


def is_variant_runtime(value: str) -> TypeGuard[VariantRuntime]:
    return value in get_args(VariantRuntime)


class GatedVariant(BaseModel):
    """One variant `export` kept in the version directory: what it is, how fast it ran where it was
    measured, and the CPU flags without which it would be slower than FP32 (server/variant_choice.py)."""

    model_config = ConfigDict(extra="forbid")

    precision: VariantPrecision
    runtime: VariantRuntime
    file: str
    parameters: dict[str, str] = Field(default_factory=dict, description="config parameters it is served with")
    images_per_s: float = Field(default=0.0, description="geometric mean of batch 1 and 8 where measured")
    needs: list[str] = Field(default_factory=list)
    gated_on: dict[str, bool] = Field(
        default_factory=dict,
        description="CPU flags whose kernels its gate figures came from: it is served "
        "only where they are the same (OpenVINO's INT8 segmenters pass with AMX, fail without)",
    )


class BatchSizing(BaseModel):
    """The served variant's throughput per batch size on the machine that built the repository, and the
    batching export derived from it for config.pbtxt (export/batch_sizing.py holds the rule)."""

    model_config = ConfigDict(extra="forbid")

    images_per_s: dict[int, float] = Field(
        default_factory=dict, description="batch size -> images/s of the served variant, one execution at a time"
    )
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    warmup_batch_sizes: list[int] = Field(default_factory=list)
    rule: str = Field(default="", description="how the sizes follow from the curve, and what was pinned")
    ceiling: int = Field(
        default=0, description="the largest batch the export allowed (the entry's or --max-batch-size)"
    )


class ServingChoice(BaseModel):
    """Which variant `export` serves (precision x runtime), why, and what it measured."""

    model_config = ConfigDict(extra="forbid")

    precision: VariantPrecision = "fp32"
    runtime: VariantRuntime = "onnxruntime"
    reason: str = ""
    pinned: bool = Field(default=False, description="--precision/--runtime chose it: the server keeps it")
    cpu: CpuInfo | None = Field(default=None, description="the CPU the speeds were measured on")
    variants: list[GatedVariant] = Field(default_factory=list, description="every variant that passed, fastest first")
    # images/s on the exporting machine, keyed "<precision>/<runtime>/b<batch>"
    throughput: dict[str, float] = Field(default_factory=dict)
    gate: list[GateFigure] = Field(default_factory=list)
    calibration: str = ""
    fp32_onnx_sha256: str = Field(default="", description="the FP32 parent an INT8 file was quantized from")
    batching: BatchSizing | None = Field(default=None, description="batch sizes measured for the served variant")


class ModelMeta(BaseModel):
    """Contents of `<repo>/<model>/model.json`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: Task
    preprocess: PreprocessSpec
    labels: list[str] | None = None
    input_name: str = "input"
    description: str = ""
    weights: str = Field(default="", description="where the served weights came from")
    metrics: dict[str, float] = Field(default_factory=dict, description="measured quality, e.g. top1, mAP50, mIoU")
    serving: ServingChoice | None = Field(default=None, description="the served precision/runtime and its gate")

    def write(self, model_dir: Path) -> Path:
        path = Path(model_dir) / META_FILENAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, model_dir: Path) -> ModelMeta:
        return cls.model_validate_json((Path(model_dir) / META_FILENAME).read_text())
