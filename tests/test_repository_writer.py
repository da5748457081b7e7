"""The repository writer on a small real ONNX graph: layout, config.pbtxt, atomic swap, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnncore.config import load_config
from cnncore.spec import ModelMeta, PreprocessSpec, Task
from export.repository import (
    BatchingDefaults,
    StagedModel,
    build_config,
    preferred_batch_sizes,
    write_model,
    write_models,
)
from protos.model_config_pb2 import DataType, ModelInstanceGroup


def _classifier_onnx(path: Path, classes: int = 3) -> Path:
    """A real tiny classifier graph: [batch,1,4,4] -> GlobalAveragePool -> Flatten -> Gemm -> [batch,classes];
    plus a second output with a variable non-batch dimension."""
    w = numpy_helper.from_array(np.ones((classes, 1), dtype=np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1),
        helper.make_node("Identity", ["input"], ["features"]),
    ]
    g = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 1, "h", 4]),
        ],
        [w],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


def _staged(tmp_path: Path, name: str = "tiny", version: int = 1, classes: int = 3) -> StagedModel:
    src = _classifier_onnx(tmp_path / f"{name}-{version}-{classes}.onnx", classes)
    proto = onnx.load(src)
    meta = ModelMeta(
        name=name,
        task=Task.classification,
        preprocess=PreprocessSpec(input_size=(4, 4), color="L"),
        labels=[f"c{i}" for i in range(classes)],
        weights="test graph",
    )
    return StagedModel(
        name=name,
        version=version,
        onnx_path=src,
        config=build_config(name, proto, 8),
        meta=meta,
        parity={"ok": True, "version": version},
        extra_files=(("labels.txt", "a\nb\nc\n"),),
    )


def test_config_from_graph(tmp_path: Path):
    cfg = build_config(
        "tiny",
        onnx.load(_classifier_onnx(tmp_path / "m.onnx")),
        16,
        BatchingDefaults(max_queue_delay_microseconds=250, instance_count=2),
    )
    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == ("tiny", "onnxruntime_onnx", "onnxruntime", 16)
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("input", DataType.TYPE_FP32, [1, 4, 4])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [3]), ("features", [1, -1, 4])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert (cfg.instance_group[0].count, cfg.instance_group[0].kind) == (2, ModelInstanceGroup.KIND_CPU)
    assert preferred_batch_sizes(2) == [2] and preferred_batch_sizes(32) == [4, 8, 16, 32]


def test_static_batch_is_rejected(tmp_path: Path):
    g = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["out"])],
        "s",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
    )
    with pytest.raises(ValueError, match="not a dynamic batch dimension"):
        build_config("s", helper.make_model(g), 8)


def test_layout_and_round_trip(tmp_path: Path):
    repo = tmp_path / "repo"
    target = write_model(repo, _staged(tmp_path))
    assert target == repo / "tiny"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
        "labels.txt",
        "model.json",
        "parity.json",
    ]
    cfg = load_config(target)  # the server's own parser reads what we wrote
    assert cfg.name == "tiny" and cfg.max_batch_size == 8
    assert ModelMeta.read(target).labels == ["c0", "c1", "c2"]
    assert json.loads((target / "parity.json").read_text())["ok"] is True
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_rewrite_is_idempotent_and_keeps_other_versions(tmp_path: Path):
    repo = tmp_path / "repo"
    write_model(repo, _staged(tmp_path, version=1))
    write_model(repo, _staged(tmp_path, version=2))
    snapshot = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert Path("tiny/1/model.onnx") in snapshot and Path("tiny/2/model.onnx") in snapshot
    write_model(repo, _staged(tmp_path, version=2))
    again = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert again == snapshot


def test_replacing_a_version_does_not_write_through_hard_links(tmp_path: Path):
    repo = tmp_path / "repo"
    write_model(repo, _staged(tmp_path, version=1, classes=3))
    kept = (repo / "tiny" / "1" / "model.onnx").read_bytes()
    write_model(repo, _staged(tmp_path, version=2, classes=5))  # version 1 is carried over as a hard link
    write_model(repo, _staged(tmp_path, version=1, classes=4))  # ... then replaced
    assert (repo / "tiny" / "1" / "model.onnx").read_bytes() != kept
    assert load_config(repo / "tiny").output[0].dims == [4]


def test_failure_while_staging_leaves_repository_untouched(tmp_path: Path):
    repo = tmp_path / "repo"
    write_model(repo, _staged(tmp_path, name="a"))
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    good = _staged(tmp_path, name="a", classes=7)
    broken = StagedModel(**{**good.__dict__, "name": "b", "onnx_path": tmp_path / "missing.onnx"})
    with pytest.raises(FileNotFoundError):
        write_models(repo, [good, broken])  # "a" staged fine, "b" fails: neither is swapped in
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in repo.iterdir()) == ["a"]


def test_latest_onnx_finds_the_newest_served_version_and_names_what_is_missing(tmp_path: Path):
    from cnncore.layout import latest_onnx, version_numbers

    repo = tmp_path / "repo"
    for version in (1, 10, 2):  # numeric order, not string order
        write_model(repo, _staged(tmp_path, version=version))
    (repo / "tiny" / "0").mkdir()  # not a version (Triton counts positive integers only)
    (repo / "tiny" / "notes").mkdir()
    assert version_numbers(repo / "tiny") == [1, 2, 10]
    path, meta = latest_onnx(repo / "tiny")
    assert path == repo / "tiny" / "10" / "model.onnx" and meta.labels == ["c0", "c1", "c2"]
    with pytest.raises(FileNotFoundError, match="no model.json"):
        latest_onnx(repo / "absent")
    (repo / "tiny" / "10" / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="10/model.onnx: no such file"):
        latest_onnx(repo / "tiny")


def test_model_names_lists_model_directories_only(tmp_path: Path):
    from cnncore.layout import model_names

    repo = tmp_path / "repo"
    write_model(repo, _staged(tmp_path, version=1))
    (repo / ".staging-tiny-x").mkdir()  # a writer's staging directory, no config.pbtxt yet
    (repo / ".tensorrt").mkdir()  # the engine builder's timing caches
    (repo / "README.txt").write_text("not a model")
    assert model_names(repo) == ["tiny"]
