"""Which TensorRT engine in a model version directory fits which GPU, and the refusal when none does.

A serialized TensorRT engine only runs on the GPU compute capability it was built for and under the
exact TensorRT version that built it; loading any other one fails deep inside TensorRT with an opaque
error (Triton users meet this as a crash or "version tag does not match"). So each engine gets a file
name that says what it is for, and `engines.json` beside it records that plus the ONNX it came from.
The server picks the record matching its GPU and TensorRT before touching the bytes, and otherwise
refuses with a message saying what exists and the command that builds the missing engine.

Layout inside `<repo>/<model>/<version>/`:
    model.onnx                  the served file (one of the variants below, or the only file)
    model.fp32.onnx             FP32 parent: FP32 and FP16 engines are built from it
    model.int8.onnx             symmetric QDQ INT8: INT8 engines are built from it (tensorrt_source)
    model.sm86.trt10.7.0.fp16.plan
    engines.json
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field

from cnncore.artifacts import FP32_FILENAME, INT8_FILENAME, INT8_OPENVINO_FILENAME, ONNX_FILENAME, file_sha256
from cnncore.spec import META_FILENAME, ModelMeta, ServingChoice

MANIFEST_FILENAME = "engines.json"
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


def is_precision(value: str) -> TypeGuard[Precision]:
    """`value` is one of PRECISIONS (a flag's string, narrowed to the manifest's type)."""
    return value in PRECISIONS


class EngineMismatch(RuntimeError):
    """No engine in the version directory fits this GPU / TensorRT / ONNX; the message says why."""


def capability_tag(compute_capability: str) -> str:
    """ "8.6" -> "sm86" (the CUDA spelling, also Triton's `cc_model_filenames` key without the dot)."""
    m = re.fullmatch(r"(\d+)\.(\d+)", compute_capability.strip())
    if not m:
        raise ValueError(f"compute capability must look like '8.6', got {compute_capability!r}")
    return f"sm{m.group(1)}{m.group(2)}"


def engine_filename(compute_capability: str, tensorrt_version: str, precision: str, stem: str = "model") -> str:
    """File name of an engine: everything that makes it (in)compatible is in the name, so engines for
    several GPUs and TensorRT releases sit side by side in one repository (or one shared cache volume)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not re.fullmatch(r"\d+(\.\d+)*", tensorrt_version):
        raise ValueError(f"TensorRT version must look like '10.7.0', got {tensorrt_version!r}")
    return f"{stem}.{capability_tag(compute_capability)}.trt{tensorrt_version}.{precision}.plan"


class ProfileShapes(BaseModel):
    """One input's optimization-profile shapes, batch dimension included."""

    model_config = ConfigDict(extra="forbid")

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


class EngineRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    compute_capability: str = Field(description="'8.6'")
    tensorrt_version: str = Field(description="tensorrt.__version__ at build time")
    precision: Precision
    gpu_name: str = ""
    onnx_file: str = Field(
        default=ONNX_FILENAME,
        description="the ONNX file of the version directory the engine was built from (tensorrt_source); "
        "manifests written before it was recorded built from model.onnx",
    )
    onnx_sha256: str = Field(description="hash of onnx_file when the engine was built")
    profiles: dict[str, ProfileShapes] = Field(default_factory=dict, description="input name -> shapes")
    workspace_mib: int = 0
    built_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def max_batch(self) -> int:
        return min((p.max[0] for p in self.profiles.values()), default=0)

    def describe(self) -> str:
        return (
            f"{self.file} (compute capability {self.compute_capability}, TensorRT {self.tensorrt_version}, "
            f"{self.precision})"
        )


class EngineManifest(BaseModel):
    """Contents of `<repo>/<model>/<version>/engines.json`."""

    model_config = ConfigDict(extra="forbid")

    engines: list[EngineRecord] = Field(default_factory=list)

    @classmethod
    def read(cls, version_dir: Path) -> EngineManifest:
        path = Path(version_dir) / MANIFEST_FILENAME
        if not path.is_file():
            return cls()
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise EngineMismatch(f"{path}: unreadable engine manifest ({exc}); rebuild the engines") from None

    def write(self, version_dir: Path) -> Path:
        path = Path(version_dir) / MANIFEST_FILENAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        tmp.replace(path)  # atomic: a server reading concurrently never sees half a manifest
        return path

    def add(self, record: EngineRecord) -> None:
        """Insert or replace the record for the same (capability, TensorRT, precision)."""
        key = (record.compute_capability, record.tensorrt_version, record.precision)
        self.engines = [e for e in self.engines if (e.compute_capability, e.tensorrt_version, e.precision) != key]
        self.engines.append(record)
        self.engines.sort(key=lambda e: (e.compute_capability, e.tensorrt_version, e.precision))


def _serving(version_dir: Path) -> ServingChoice | None:
    path = version_dir.parent / META_FILENAME
    if not path.is_file():
        return None  # a hand-made or Triton-style repository: only its files say what it holds
    try:
        return ModelMeta.read(version_dir.parent).serving
    except ValueError as exc:
        raise EngineMismatch(f"{path}: unreadable model metadata ({exc}); re-export the model") from None


def tensorrt_source(version_dir: Path, precision: str) -> Path:
    """The ONNX file of `version_dir` a TensorRT engine of `precision` is built from (and checked against).

    model.onnx is whatever `export` serves, which may be OpenVINO's INT8 file: its unsigned activations
    are not TensorRT's INT8 (symmetric, zero point 0) and its parser refuses them. So an INT8 engine is
    built from the symmetric QDQ file export keeps beside it, and FP32 / FP16 engines from the FP32
    parent (not from a quantized served file). A directory without those files (written before export
    kept variants, or by hand) builds from model.onnx. So does one whose model.json lists no variants:
    with --input-dtype uint8 the kept files are the float-input parents, model.onnx the pixel-input graph
    the config declares.
    """
    version_dir = Path(version_dir)
    served = version_dir / ONNX_FILENAME
    serving = _serving(version_dir)
    kept_interchangeable = serving is None or bool(serving.variants)
    if precision == "int8":
        if kept_interchangeable and (version_dir / INT8_FILENAME).is_file():
            return version_dir / INT8_FILENAME
        if serving is not None and serving.precision == "int8" and serving.runtime == "openvino":
            raise EngineMismatch(
                f"{served}: OpenVINO's INT8 file (unsigned activations; {INT8_OPENVINO_FILENAME}) is "
                f"served and no symmetric {INT8_FILENAME} beside it for TensorRT to build an INT8 engine "
                f"from; re-export the model (python -m export), or build with --precision fp16"
            )
        return served
    if kept_interchangeable and (version_dir / FP32_FILENAME).is_file():
        return version_dir / FP32_FILENAME
    return served


def select_engine(
    version_dir: Path,
    compute_capability: str,
    tensorrt_version: str,
    precision: str | None = None,
    onnx_path: Path | None = None,
) -> EngineRecord:
    """The record of the engine to load on this GPU, or EngineMismatch saying what exists and what to do.

    precision None prefers the fastest one present (int8 > fp16 > fp32). When `onnx_path` is given
    (default: the engine's TensorRT source in the version directory, `tensorrt_source`, if it exists) an
    engine built from another ONNX is stale and refused: it would run, but serve a different model than
    the repository says. The comparison is by hash, so an engine recorded as built from model.onnx stays
    current while that file's bytes are now the FP32 parent's or the symmetric INT8 file's.
    """
    version_dir = Path(version_dir)
    manifest = EngineManifest.read(version_dir)
    rebuild = (
        f"build one with: python -m export engine --repository {version_dir.parent.parent} "
        f"--models {version_dir.parent.name}"
    )
    if not manifest.engines:
        raise EngineMismatch(
            f"{version_dir}: no TensorRT engine built ({MANIFEST_FILENAME} missing or empty); {rebuild}"
        )
    here = f"this machine has compute capability {compute_capability} and TensorRT {tensorrt_version}"
    same_gpu = [e for e in manifest.engines if e.compute_capability == compute_capability]
    if not same_gpu:
        built = ", ".join(sorted({e.compute_capability for e in manifest.engines}))
        raise EngineMismatch(
            f"{version_dir}: no TensorRT engine for this GPU: engines exist for compute "
            f"capability {built}, {here}; {rebuild}"
        )
    same_trt = [e for e in same_gpu if e.tensorrt_version == tensorrt_version]
    if not same_trt:
        built = ", ".join(sorted({e.tensorrt_version for e in same_gpu}))
        raise EngineMismatch(
            f"{version_dir}: TensorRT version mismatch: engines for compute capability "
            f"{compute_capability} were built with TensorRT {built}, {here} (an engine only "
            f"loads under the TensorRT release that built it); {rebuild}"
        )
    if precision is not None:
        candidates = [e for e in same_trt if e.precision == precision]
        if not candidates:
            have = ", ".join(e.precision for e in same_trt)
            raise EngineMismatch(
                f"{version_dir}: no {precision} engine for compute capability "
                f"{compute_capability} / TensorRT {tensorrt_version} (have: {have}); "
                f"{rebuild} --precision {precision}"
            )
    else:
        order = {"int8": 0, "fp16": 1, "fp32": 2}
        candidates = sorted(same_trt, key=lambda e: order[e.precision])
    record = candidates[0]
    engine_path = version_dir / record.file
    if not engine_path.is_file():
        raise EngineMismatch(f"{engine_path}: listed in {MANIFEST_FILENAME} but the file is missing; {rebuild}")
    if onnx_path is None:
        source = tensorrt_source(version_dir, record.precision)
        onnx_path = source if source.is_file() else None
    if onnx_path is not None and file_sha256(Path(onnx_path)) != record.onnx_sha256:
        raise EngineMismatch(
            f"{engine_path}: stale engine: built from {record.onnx_file}, whose bytes differ from "
            f"{Path(onnx_path).name} in the repository now (the {record.precision} engine's source); {rebuild}"
        )
    return record
