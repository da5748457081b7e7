"""A repository built on one CPU, served on another: the server serves the best gated variant for its own
CPU (server/variant_choice.py), logs which and why, and keeps a pinned choice.

The other CPU is simulated through the recorded flags: model.json says the variants were measured on a
CPU with AMX where BF16 was fastest, and this process's CPU is described with AMX and AVX-512 BF16
hidden (ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI, which OpenVINO honours), so the flags differ on any x86
machine. The files are real and the real loader builds the real backends.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from cnncore.cpu import CpuInfo, current_cpu
from cnncore.spec import GatedVariant, ModelMeta, PreprocessSpec, ServingChoice, Task
from conftest import pool_model, write_model
from server.repository import ModelRepository

pytest.importorskip("openvino")

AMX = CpuInfo(flags={"avx512_vnni": True, "avx512_bf16": True, "amx_bf16": True, "amx_int8": True}, cores=2)
BF16_CONFIG = """max_batch_size: 4
backend: "openvino"
default_model_filename: "model.onnx"
parameters { key: "precision" value { string_value: "BF16" } }
parameters { key: "INFERENCE_PRECISION_HINT" value { string_value: "bf16" } }
"""


def _model(repo: Path, name: str, recorded: CpuInfo, pinned: bool = False) -> None:
    d = write_model(repo, name, pool_model(), BF16_CONFIG)
    (d / "1" / "model.fp32.onnx").write_bytes(pool_model())
    variants = [
        GatedVariant(
            precision="bf16",
            runtime="openvino",
            file="model.fp32.onnx",
            parameters={"INFERENCE_PRECISION_HINT": "bf16"},
            images_per_s=900.0,
            needs=["amx_bf16"],
        ),
        GatedVariant(precision="fp32", runtime="onnxruntime", file="model.fp32.onnx", images_per_s=400.0),
    ]
    ModelMeta(
        name=name,
        task=Task.classification,
        preprocess=PreprocessSpec(input_size=(224, 224)),
        serving=ServingChoice(
            precision="bf16", runtime="openvino", reason="test", cpu=recorded, variants=variants, pinned=pinned
        ),
    ).write(d)


def _load(repo: Path) -> ModelRepository:
    async def main() -> ModelRepository:
        r = ModelRepository(repo)
        await r.load_all()
        return r

    return asyncio.run(main())


def test_a_cpu_without_amx_serves_the_next_gated_variant_and_a_pin_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from server.backends.openvino_backend import OpenVinoBackend
    from server.backends.ort_backend import OrtBackend

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    here = current_cpu()
    assert not here.has("amx_bf16") and not here.same_features(AMX)
    _model(tmp_path, "moved", AMX)
    _model(tmp_path, "pinned", AMX, pinned=True)
    _model(tmp_path, "same_cpu", here)  # measured on this very CPU: its choice stands
    with caplog.at_level(logging.INFO, logger="cnnserve.variant_choice"):
        repo = _load(tmp_path)
    moved = repo.get("moved")
    assert isinstance(moved.instances[0], OrtBackend)
    x = np.random.default_rng(0).random((2, 3, 224, 224), np.float32)
    np.testing.assert_allclose(moved.instances[0].execute({"x": x})["y"], x.mean(axis=(2, 3), keepdims=True), rtol=1e-5)
    logged = [r for r in caplog.records if getattr(r, "model", "") == "moved"]
    why = getattr(logged[0], "why", "") if logged else ""  # the log record's `extra`
    assert "bf16/openvino -> fp32/onnxruntime" in why and "needs amx_bf16" in why
    assert getattr(logged[0], "variant", "") == "fp32/onnxruntime"
    for name in ("pinned", "same_cpu"):
        kept = repo.get(name).instances[0]
        assert isinstance(kept, OpenVinoBackend), name
    assert not [r for r in caplog.records if getattr(r, "model", "") in ("pinned", "same_cpu")]


def test_recorded_flags_decide_only_where_they_differ() -> None:
    from cnncore.variant_select import reselect

    vnni = CpuInfo(flags={"avx512_vnni": True}, cores=2)
    meta = ModelMeta(
        name="m",
        task=Task.classification,
        preprocess=PreprocessSpec(input_size=(8, 8)),
        serving=ServingChoice(
            precision="bf16",
            runtime="openvino",
            cpu=AMX,
            variants=[
                GatedVariant(precision="bf16", runtime="openvino", file="a", needs=["amx_bf16"]),
                GatedVariant(precision="int8", runtime="openvino", file="b", needs=["avx512_vnni"]),
                GatedVariant(precision="fp32", runtime="openvino", file="c"),
            ],
        ),
    )
    assert reselect(meta, AMX) is None
    with_vnni, without = reselect(meta, vnni), reselect(meta, CpuInfo(flags={}, cores=2))
    assert with_vnni is not None and with_vnni.variant.file == "b"  # INT8 still beats FP32 with VNNI
    assert without is not None and without.variant.file == "c"  # never slower than FP32
    assert meta.serving is not None
    assert reselect(meta.model_copy(update={"serving": meta.serving.model_copy(update={"cpu": None})}), vnni) is None
    # an INT8 gated with AMX kernels is not served where they are absent: its figures do not transfer
    amx_gated = meta.serving.model_copy(
        update={
            "variants": [
                meta.serving.variants[0],
                GatedVariant(
                    precision="int8",
                    runtime="openvino",
                    file="b",
                    needs=["avx512_vnni"],
                    gated_on={"avx512_vnni": True, "amx_int8": True},
                ),
                meta.serving.variants[2],
            ]
        }
    )
    choice = reselect(meta.model_copy(update={"serving": amx_gated}), vnni)
    assert choice is not None
    assert choice.variant.file == "c" and "gated with amx_int8 present" in choice.reason, choice.reason
    assert current_cpu(cpuinfo="flags\t: fpu avx512_vnni amx_bf16\n", max_isa="AVX512_CORE_VNNI").flags == {
        "avx512_vnni": True,
        "avx512_bf16": False,
        "amx_bf16": False,
        "amx_int8": False,
    }
