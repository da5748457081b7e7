"""TensorRT engine build support: naming, manifest, refusal of mismatched engines, profiles, calibration.

Everything but the build itself runs without TensorRT or a GPU; the build test skips with the reason.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnncore.artifacts import FP32_FILENAME, INT8_FILENAME, INT8_OPENVINO_FILENAME, ONNX_FILENAME, file_sha256
from cnncore.config import parse_config
from cnncore.engine_manifest import (
    MANIFEST_FILENAME,
    EngineManifest,
    EngineMismatch,
    EngineRecord,
    Precision,
    ProfileShapes,
    capability_tag,
    engine_filename,
    select_engine,
    tensorrt_source,
)
from cnncore.spec import GatedVariant, ModelMeta, PreprocessSpec, ServingChoice, Task, VariantPrecision, VariantRuntime
from export.tensorrt.activation import activate_tensorrt
from export.tensorrt.build import check_precision_supported, timing_cache_path
from export.tensorrt.calibration import calibration_batches, load_calibration_samples, select_calibration_files
from export.tensorrt.cli import main
from export.tensorrt.errors import BuildError
from export.tensorrt.gpu import GpuInfo
from export.tensorrt.profiles import derive_profile, profiles_from_config
from export.tensorrt.repository_engines import current_engine

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_GPU = Path("/dev/nvidiactl").exists()  # the NVIDIA driver's control node: a GPU box, torch or not


def _version_dir(tmp_path: Path) -> Path:
    vdir = tmp_path / "repo" / "resnet18" / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.onnx").write_bytes(b"onnx graph bytes v1")
    return vdir


def _record(vdir: Path, cc: str = "8.6", trt: str = "10.7.0", precision: Precision = "fp16") -> EngineRecord:
    name = engine_filename(cc, trt, precision)
    (vdir / name).write_bytes(b"engine " + name.encode())
    prof = ProfileShapes(min=(1, 3, 224, 224), opt=(8, 3, 224, 224), max=(32, 3, 224, 224))
    return EngineRecord(
        file=name,
        compute_capability=cc,
        tensorrt_version=trt,
        precision=precision,
        gpu_name="NVIDIA A10",
        onnx_sha256=file_sha256(vdir / "model.onnx"),
        profiles={"input": prof},
    )


# ------------------------------------------------------------------ naming


def test_engine_filename_names_capability_tensorrt_and_precision():
    assert engine_filename("8.6", "10.7.0", "fp16") == "model.sm86.trt10.7.0.fp16.plan"
    assert engine_filename("9.0", "10.13.3.9", "int8") == "model.sm90.trt10.13.3.9.int8.plan"
    assert capability_tag("12.0") == "sm120"
    # Different GPUs / TensorRT releases never collide in one directory.
    assert len({engine_filename(cc, v, "fp16") for cc in ("7.5", "8.6", "8.9") for v in ("10.6.0", "10.7.0")}) == 6


@pytest.mark.parametrize("args", [("86", "10.7.0", "fp16"), ("8.6", "ten", "fp16"), ("8.6", "10.7.0", "bf16")])
def test_engine_filename_rejects_malformed_parts(args):
    with pytest.raises(ValueError):
        engine_filename(*args)


def test_timing_cache_is_per_capability_and_tensorrt_version(tmp_path):
    a = timing_cache_path(tmp_path, GpuInfo("8.6", "A10"), "10.7.0")
    b = timing_cache_path(tmp_path, GpuInfo("8.9", "L4"), "10.7.0")
    assert a != b and a.parent == b.parent == tmp_path / ".tensorrt"
    assert "sm86" in a.name and "10.7.0" in a.name


# ------------------------------------------------------------------ manifest


def test_manifest_roundtrip_and_replace(tmp_path):
    vdir = _version_dir(tmp_path)
    m = EngineManifest()
    m.add(_record(vdir, "8.6", "10.7.0", "fp16"))
    m.add(_record(vdir, "8.9", "10.7.0", "fp16"))
    m.write(vdir)
    back = EngineManifest.read(vdir)
    assert back == m and len(back.engines) == 2
    assert back.engines[0].profiles["input"].opt == (8, 3, 224, 224)
    # Rebuilding the same (capability, TensorRT, precision) replaces, never duplicates.
    back.add(_record(vdir, "8.6", "10.7.0", "fp16"))
    assert len(back.engines) == 2
    assert json.loads((vdir / MANIFEST_FILENAME).read_text())["engines"][1]["compute_capability"] == "8.9"


def test_select_engine_matches_capability_and_version(tmp_path):
    vdir = _version_dir(tmp_path)
    m = EngineManifest()
    for rec in (
        _record(vdir, "8.6", "10.7.0", "fp32"),
        _record(vdir, "8.6", "10.7.0", "fp16"),
        _record(vdir, "8.9", "10.7.0", "fp16"),
    ):
        m.add(rec)
    m.write(vdir)
    assert select_engine(vdir, "8.6", "10.7.0").file == "model.sm86.trt10.7.0.fp16.plan"  # fastest present
    assert select_engine(vdir, "8.6", "10.7.0", "fp32").precision == "fp32"
    assert select_engine(vdir, "8.9", "10.7.0").compute_capability == "8.9"


def test_select_engine_refuses_other_gpu_with_a_clear_message(tmp_path):
    vdir = _version_dir(tmp_path)
    m = EngineManifest()
    m.add(_record(vdir, "8.6", "10.7.0"))
    m.write(vdir)
    with pytest.raises(EngineMismatch) as exc:
        select_engine(vdir, "9.0", "10.7.0")
    msg = str(exc.value)
    assert "no TensorRT engine for this GPU" in msg and "8.6" in msg and "9.0" in msg
    assert "python -m export engine --repository" in msg and "--models resnet18" in msg


def test_select_engine_refuses_other_tensorrt_version(tmp_path):
    vdir = _version_dir(tmp_path)
    m = EngineManifest()
    m.add(_record(vdir, "8.6", "10.6.0"))
    m.write(vdir)
    with pytest.raises(EngineMismatch, match=r"TensorRT version mismatch.*10\.6\.0.*TensorRT 10\.7\.0"):
        select_engine(vdir, "8.6", "10.7.0")


def test_select_engine_refuses_missing_precision_file_and_stale_onnx(tmp_path):
    vdir = _version_dir(tmp_path)
    rec = _record(vdir, "8.6", "10.7.0", "fp16")
    m = EngineManifest()
    m.add(rec)
    m.write(vdir)
    with pytest.raises(EngineMismatch, match="no int8 engine.*have: fp16.*--precision int8"):
        select_engine(vdir, "8.6", "10.7.0", "int8")
    (vdir / "model.onnx").write_bytes(b"re-exported graph")
    with pytest.raises(EngineMismatch, match="stale engine"):
        select_engine(vdir, "8.6", "10.7.0")
    (vdir / "model.onnx").write_bytes(b"onnx graph bytes v1")
    (vdir / rec.file).unlink()
    with pytest.raises(EngineMismatch, match="file is missing"):
        select_engine(vdir, "8.6", "10.7.0")


# ------------------------------------------------------------------ the file an engine is built from

_BYTES = {
    FP32_FILENAME: b"fp32 parent",
    INT8_FILENAME: b"symmetric qdq int8",
    INT8_OPENVINO_FILENAME: b"openvino's int8, unsigned activations",
}
_SERVED_FILE: dict[tuple[VariantPrecision, VariantRuntime], str] = {
    ("fp32", "onnxruntime"): FP32_FILENAME,
    ("bf16", "openvino"): FP32_FILENAME,
    ("int8", "onnxruntime"): INT8_FILENAME,
    ("int8", "openvino"): INT8_OPENVINO_FILENAME,
}


def _exported(
    tmp_path: Path,
    served: tuple[VariantPrecision, VariantRuntime] | None,
    kept: tuple[str, ...],
    variants: bool = True,
) -> Path:
    """A version directory as `export` writes it: model.onnx a copy of the served variant's file, the
    kept files beside it, model.json's serving naming the served variant (None: no model.json)."""
    vdir = tmp_path / "repo" / "m" / "1"
    vdir.mkdir(parents=True)
    for f in kept:
        (vdir / f).write_bytes(_BYTES[f])
    if served is None:
        (vdir / ONNX_FILENAME).write_bytes(b"the only file")
        return vdir
    (vdir / ONNX_FILENAME).write_bytes(_BYTES[_SERVED_FILE[served]])
    listed = [GatedVariant(precision=p, runtime=r, file=f) for (p, r), f in _SERVED_FILE.items() if f in kept]
    serving = ServingChoice(precision=served[0], runtime=served[1], variants=listed if variants else [])
    spec = PreprocessSpec(input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ModelMeta(name="m", task=Task.classification, preprocess=spec, serving=serving).write(vdir.parent)
    return vdir


ALL_KEPT = (FP32_FILENAME, INT8_FILENAME, INT8_OPENVINO_FILENAME)


@pytest.mark.parametrize(
    "served, kept, variants, int8_from, fp16_from",
    [
        # written before export kept variants, or by hand: the one file
        (None, (), True, ONNX_FILENAME, ONNX_FILENAME),
        # FP32 served, INT8 not quantized (no calibration data): an INT8 engine calibrates the FP32 file
        (("fp32", "onnxruntime"), (FP32_FILENAME,), True, ONNX_FILENAME, FP32_FILENAME),
        # FP32 or BF16 served, the symmetric INT8 kept (gated or not) for `export engine`
        (("fp32", "onnxruntime"), (FP32_FILENAME, INT8_FILENAME), True, INT8_FILENAME, FP32_FILENAME),
        (("bf16", "openvino"), ALL_KEPT, True, INT8_FILENAME, FP32_FILENAME),
        # the symmetric INT8 served by ONNX Runtime: model.onnx has its bytes, the kept file is named
        (("int8", "onnxruntime"), (FP32_FILENAME, INT8_FILENAME), True, INT8_FILENAME, FP32_FILENAME),
        # OpenVINO's INT8 served: model.onnx is a file TensorRT cannot parse, never the source
        (("int8", "openvino"), ALL_KEPT, True, INT8_FILENAME, FP32_FILENAME),
        # --input-dtype uint8: the kept files are float-input parents, model.onnx the pixel-input graph
        (("int8", "onnxruntime"), (FP32_FILENAME, INT8_FILENAME), False, ONNX_FILENAME, ONNX_FILENAME),
    ],
)
def test_tensorrt_source_names_the_symmetric_int8_or_the_fp32_parent(
    tmp_path, served, kept, variants, int8_from, fp16_from
):
    vdir = _exported(tmp_path, served, kept, variants)
    assert tensorrt_source(vdir, "int8") == vdir / int8_from
    assert tensorrt_source(vdir, "fp16") == tensorrt_source(vdir, "fp32") == vdir / fp16_from


def test_tensorrt_source_refuses_openvinos_int8_without_the_symmetric_file(tmp_path):
    vdir = _exported(tmp_path, ("int8", "openvino"), (FP32_FILENAME, INT8_OPENVINO_FILENAME))
    with pytest.raises(EngineMismatch) as err:
        tensorrt_source(vdir, "int8")
    assert "OpenVINO's INT8" in str(err.value) and INT8_FILENAME in str(err.value)
    assert "re-export" in str(err.value) and "--precision fp16" in str(err.value)
    assert tensorrt_source(vdir, "fp16") == vdir / FP32_FILENAME  # FP16 from the parent still builds


def _built_from(vdir: Path, source: str, precision: Precision) -> EngineRecord:
    rec = _record(vdir, "8.6", "10.7.0", precision)
    return rec.model_copy(update={"onnx_file": source, "onnx_sha256": file_sha256(vdir / source)})


def test_select_engine_checks_each_engine_against_its_own_source(tmp_path):
    vdir = _exported(tmp_path, ("int8", "openvino"), ALL_KEPT)
    m = EngineManifest()
    m.add(_built_from(vdir, INT8_FILENAME, "int8"))
    m.add(_built_from(vdir, FP32_FILENAME, "fp16"))
    m.write(vdir)
    assert EngineManifest.read(vdir).engines[1].onnx_file == INT8_FILENAME  # recorded in engines.json
    assert select_engine(vdir, "8.6", "10.7.0").precision == "int8"
    # The served file changes (a re-export serving another variant): neither engine's source did.
    (vdir / ONNX_FILENAME).write_bytes(_BYTES[FP32_FILENAME] + b" re-served")
    assert select_engine(vdir, "8.6", "10.7.0", "int8").onnx_file == INT8_FILENAME
    assert select_engine(vdir, "8.6", "10.7.0", "fp16").onnx_file == FP32_FILENAME
    # A re-quantized symmetric file makes the INT8 engine stale, and only it.
    (vdir / INT8_FILENAME).write_bytes(b"re-quantized")
    with pytest.raises(EngineMismatch, match=rf"stale engine: built from {INT8_FILENAME}, whose bytes differ"):
        select_engine(vdir, "8.6", "10.7.0", "int8")
    assert select_engine(vdir, "8.6", "10.7.0", "fp16").precision == "fp16"


def test_a_manifest_written_before_sources_were_recorded_keeps_working(tmp_path):
    """engines.json without onnx_file: the engine was built from model.onnx. It stays current while its
    hash matches the source the builder would use now (here the FP32 parent, model.onnx's old bytes)."""
    vdir = _version_dir(tmp_path)
    rec = _record(vdir, "8.6", "10.7.0", "fp16")
    old = {"engines": [{k: v for k, v in rec.model_dump(mode="json").items() if k != "onnx_file"}]}
    (vdir / MANIFEST_FILENAME).write_text(json.dumps(old))
    assert select_engine(vdir, "8.6", "10.7.0").onnx_file == ONNX_FILENAME
    # re-exported with variants: the FP32 parent has the old model.onnx's bytes, INT8 is served now
    (vdir / FP32_FILENAME).write_bytes((vdir / ONNX_FILENAME).read_bytes())
    (vdir / ONNX_FILENAME).write_bytes(_BYTES[INT8_FILENAME])
    (vdir / INT8_FILENAME).write_bytes(_BYTES[INT8_FILENAME])
    assert select_engine(vdir, "8.6", "10.7.0").precision == "fp16"
    (vdir / FP32_FILENAME).write_bytes(b"another parent")
    with pytest.raises(EngineMismatch, match=rf"built from {ONNX_FILENAME}, whose bytes differ from {FP32_FILENAME}"):
        select_engine(vdir, "8.6", "10.7.0")


def test_no_or_corrupt_manifest_is_a_refusal_not_a_crash(tmp_path):
    vdir = _version_dir(tmp_path)
    with pytest.raises(EngineMismatch, match="no TensorRT engine built"):
        select_engine(vdir, "8.6", "10.7.0")
    (vdir / MANIFEST_FILENAME).write_text("{not json")
    with pytest.raises(EngineMismatch, match="unreadable engine manifest"):
        select_engine(vdir, "8.6", "10.7.0")


def test_server_side_resolution_turns_mismatch_into_backend_unavailable(tmp_path):
    from server.backends.base import BackendUnavailable
    from server.backends.trt_engine import resolve_engine_file

    vdir = _version_dir(tmp_path)
    rec = _record(vdir, "8.6", "10.7.0")
    m = EngineManifest()
    m.add(rec)
    m.write(vdir)
    assert resolve_engine_file(vdir, "8.6", "10.7.0") == vdir / rec.file
    assert resolve_engine_file(vdir / rec.file, "8.6", "10.7.0") == vdir / rec.file
    with pytest.raises(BackendUnavailable, match="compute capability 8.6.*this machine has compute capability 7.5"):
        resolve_engine_file(vdir, "7.5", "10.7.0")
    with pytest.raises(BackendUnavailable, match="TensorRT version mismatch"):
        resolve_engine_file(vdir / rec.file, "8.6", "10.8.0")


def test_cached_engine_is_found_only_for_the_same_gpu_tensorrt_precision_and_onnx(tmp_path):
    vdir = _version_dir(tmp_path)
    m = EngineManifest()
    m.add(_record(vdir, "8.6", "10.7.0", "fp16"))
    m.write(vdir)
    a10 = GpuInfo("8.6", "A10")
    assert current_engine(vdir, a10, "10.7.0", "fp16").file == "model.sm86.trt10.7.0.fp16.plan"
    assert current_engine(vdir, a10, "10.7.0", "fp32") is None
    assert current_engine(vdir, GpuInfo("9.0", "H100"), "10.7.0", "fp16") is None
    assert current_engine(vdir, a10, "10.8.0", "fp16") is None
    (vdir / "model.onnx").write_bytes(b"new export")
    assert current_engine(vdir, a10, "10.7.0", "fp16") is None


def test_activate_points_the_config_at_the_engines(tmp_path):
    from cnncore.config import load_config

    model_dir = tmp_path / "resnet18"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text("""
name: "resnet18"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [{ name: "input" data_type: TYPE_FP32 dims: [3, 224, 224] }]
output [{ name: "logits" data_type: TYPE_FP32 dims: [1000] }]
instance_group [{ kind: KIND_CPU count: 2 }]
dynamic_batching { preferred_batch_size: [8] }
""")
    vdir = model_dir / "1"
    vdir.mkdir()
    (vdir / "model.onnx").write_bytes(b"graph")
    activate_tensorrt(model_dir, _record(vdir, "8.9", "10.7.0", "fp16"))
    cfg = load_config(model_dir)
    assert cfg.backend == "tensorrt" and cfg.platform == "" and cfg.default_model_filename == ""
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(1, 2)]  # KIND_GPU, count kept
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8] and cfg.max_batch_size == 32
    assert dict(cfg.cc_model_filenames) == {"8.9": "model.sm89.trt10.7.0.fp16.plan"}  # Triton's per-GPU map


def test_lone_triton_style_model_plan_is_taken_as_is(tmp_path):
    from server.backends.trt_engine import resolve_engine_file

    vdir = tmp_path / "m" / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.plan").write_bytes(b"engine")
    assert resolve_engine_file(vdir, "8.6", "10.7.0") == vdir / "model.plan"


# ------------------------------------------------------------------ optimization profile


def test_profile_min_one_opt_preferred_max_batch():
    p = derive_profile([3, 224, 224], max_batch_size=32, preferred_batch_sizes=[4, 8])
    assert p.min == (1, 3, 224, 224) and p.opt == (8, 3, 224, 224) and p.max == (32, 3, 224, 224)


def test_profile_without_preferred_batch_optimizes_for_full_batches():
    assert derive_profile([1, 28, 28], 16).opt == (16, 1, 28, 28)
    # A preferred size beyond max_batch_size cannot be a profile opt: ignored.
    assert derive_profile([1, 28, 28], 16, [64]).opt == (16, 1, 28, 28)


def test_profile_without_batching_and_bad_dims():
    p = derive_profile([1, 3, 64, 64], max_batch_size=0)
    assert p.min == p.opt == p.max == (1, 3, 64, 64)
    with pytest.raises(BuildError, match="variable"):
        derive_profile([3, -1, -1], 8)
    with pytest.raises(BuildError, match="max_batch_size"):
        derive_profile([3, 8, 8], -1)


def test_profiles_from_config_pbtxt():
    cfg = parse_config("""
name: "resnet18"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [{ name: "input" data_type: TYPE_FP32 dims: [3, 224, 224] }]
output [{ name: "logits" data_type: TYPE_FP32 dims: [1000] }]
dynamic_batching { preferred_batch_size: [8, 16] max_queue_delay_microseconds: 500 }
""")
    profiles = profiles_from_config(cfg)
    assert list(profiles) == ["input"]
    assert profiles["input"].opt == (16, 3, 224, 224) and profiles["input"].max[0] == 32


# ------------------------------------------------------------------ calibration data


def test_calibration_selection_is_deterministic_and_mixed(tmp_path):
    cal = tmp_path / "calibration"
    cal.mkdir()
    for cls in range(4):
        for i in range(10):
            (cal / f"class{cls}_{i:02d}.npy").write_bytes(b"")
    (cal / "README.txt").write_text("not a sample")
    a = select_calibration_files(cal, 12, seed=0)
    assert a == select_calibration_files(cal, 12, seed=0)
    assert a != select_calibration_files(cal, 12, seed=1)
    assert len(a) == 12 and all(p.suffix == ".npy" for p in a)
    assert len({p.name[:6] for p in a}) > 1  # not the first class only
    assert len(select_calibration_files(cal, 0)) == 40  # 0: all of them


def test_calibration_without_samples_is_a_clear_error(tmp_path):
    with pytest.raises(BuildError, match="needs sample inputs"):
        select_calibration_files(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no calibration samples"):
        select_calibration_files(tmp_path / "empty", 8)


def test_calibration_images_use_the_models_own_preprocessing(tmp_path):
    from cnncore.preprocess import preprocess

    model_dir = tmp_path / "fashion"
    cal = model_dir / "calibration"
    cal.mkdir(parents=True)
    spec = PreprocessSpec(input_size=(28, 28), color="L", mean=(0.5,), std=(0.25,), invert=True)
    ModelMeta(name="fashion", task=Task.classification, preprocess=spec).write(model_dir)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 32), dtype=np.uint8)).save(cal / f"{i}.png")
    np.save(cal / "extra.npy", rng.standard_normal((3, 1, 28, 28)).astype(np.float32))
    files = select_calibration_files(cal, 0)
    samples = load_calibration_samples(files, model_dir, (1, 28, 28))
    assert samples.shape == (8, 1, 28, 28) and samples.dtype == np.float32
    with Image.open(cal / "0.png") as img:
        expected, _ = preprocess(img, spec)
    np.testing.assert_array_equal(samples[0], expected)
    batches = list(calibration_batches(samples, 3))
    assert [b.shape[0] for b in batches] == [3, 3]  # the short tail is dropped
    with pytest.raises(BuildError, match="preprocessed to"):
        load_calibration_samples(files[:1], model_dir, (3, 28, 28))


# ------------------------------------------------------------------ precision / TensorRT availability


def test_tensorrt_11_refuses_weak_typing_precisions():
    check_precision_supported("fp16", "10.7.0")
    check_precision_supported("int8", "10.13.3.9")
    check_precision_supported("fp32", "11.4.0")
    with pytest.raises(BuildError, match="removed weak-typing precision flags"):
        check_precision_supported("fp16", "11.4.0")


@pytest.mark.skipif(HAVE_TRT, reason="checks the message on machines without TensorRT")
def test_cli_without_tensorrt_says_so(tmp_path, capsys):
    assert main(["--repository", str(tmp_path), "--precision", "fp16"]) == 1
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed on this machine")
@pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU on this machine")
def test_build_engine_and_parity_on_gpu(tmp_path):
    import torch
    from torch import nn

    from export.tensorrt.build import build_engine
    from export.tensorrt.engine_parity import engine_parity

    vdir = tmp_path / "tiny" / "1"
    vdir.mkdir(parents=True)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    ).eval()
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 32, 32),),
        str(vdir / "model.onnx"),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", max=16)},),
        dynamo=True,
        external_data=False,
    )
    profiles = {"input": derive_profile([3, 32, 32], 16, [8])}
    rec = build_engine(
        vdir / "model.onnx", profiles, precision="fp32", workspace_mib=256, timing_cache=tmp_path / "timing.cache"
    )
    assert (vdir / rec.file).is_file() and (tmp_path / "timing.cache").is_file()
    assert rec.onnx_file == "model.onnx" and rec.onnx_sha256 == file_sha256(vdir / "model.onnx")
    report = engine_parity(vdir, rec)
    assert report.ok, report.failure_message()
    assert report.batch_sizes == [1, 2, 3, 16]


def test_main_cli_engine_subcommand_reaches_the_builder(tmp_path):
    """`python -m export engine ...` is the engine builder's own CLI; without TensorRT it says so."""
    import subprocess
    import sys as _sys

    root = Path(__file__).resolve().parents[1]
    help_out = subprocess.run(
        [_sys.executable, "-m", "export", "engine", "--help"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert help_out.returncode == 0 and "--precision" in help_out.stdout
    if importlib.util.find_spec("tensorrt") is not None:
        return
    run = subprocess.run(
        [_sys.executable, "-m", "export", "engine", "--repository", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "TensorRT is not installed" in run.stderr
