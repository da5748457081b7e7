"""Every registry model exports, passes parity and the TensorRT lint; the CLI's repository contract.

The parametrized test picks up every model in the registry, so a family added later is covered without
touching this file. Big models are marked slow (they still run in CI) and check parity at batch 1 and
2 only, which keeps their cost to the export itself.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from export.eager_parity import ort_session
from export.pipeline import ExportFailed, ExportOptions, export_model
from export.variants import FP32_FILENAME
from models.registry import get_entry

ROOT = Path(__file__).resolve().parents[1]
BIG = re.compile(r"^(vgg|alexnet|resnet101|resnet152|fasterrcnn_resnet50)")


def _params():
    out = []
    for name in models.list_models():
        marks = [pytest.mark.slow] if BIG.match(name) else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params())
def test_model_exports_with_parity_and_lint(name: str, tmp_path: Path):
    torch.set_num_threads(2)
    entry = get_entry(name)
    sizes = [1, 2] if BIG.match(name) else [1, 2, 3]
    options = ExportOptions(weights="default" if entry.has_weights else "none", parity_batch_sizes=sizes)
    outcome = export_model(name, tmp_path, options)

    assert outcome.parity.ok, outcome.parity.failure_message()
    assert outcome.parity.batch_sizes == sizes
    assert outcome.lint.ok, [str(i) for i in outcome.lint.issues]
    path = outcome.export.path
    # the served file and the FP32 parent export keeps beside it (export/variants.py): whole ONNX files,
    # no external data
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == sorted({"model.onnx", FP32_FILENAME})

    cfg = outcome.staged.config
    # sized from the served variant's measured curve (export/batch_sizing.py), within the entry's range
    serving = outcome.staged.meta.serving
    assert serving is not None and serving.batching is not None
    sizing = serving.batching
    assert sizing.ceiling == entry.max_batch_size
    assert cfg.max_batch_size == sizing.max_batch_size <= entry.max_batch_size
    assert [w.batch_size for w in cfg.model_warmup] == sizing.warmup_batch_sizes
    assert [i.name for i in cfg.input] == ["input"]
    assert tuple(cfg.input[0].dims) == entry.input_shape
    assert [o.name for o in cfg.output] == list(entry.output_names)
    meta = outcome.staged.meta
    assert meta.task == entry.task and meta.preprocess == entry.preprocess
    assert outcome.staged.parity["tensorrt_lint"]["ok"] and outcome.staged.parity["parity"]["ok"]

    # the batch dimension really is dynamic: a size parity did not use runs and keeps per-sample results
    if not BIG.match(name):
        sess = ort_session(path)
        x = np.random.default_rng(1).standard_normal((5, *entry.input_shape)).astype(np.float32)
        if entry.example_inputs is not None:
            x = entry.example_inputs(5).numpy()
        full = sess.run(None, {"input": x})
        single = sess.run(None, {"input": x[3:4]})
        assert full[0].shape[0] == 5
        for f, s in zip(full, single, strict=True):
            if np.issubdtype(f.dtype, np.floating):
                np.testing.assert_allclose(f[3:4], s, rtol=1e-4, atol=1e-4)


def test_unknown_model_and_missing_weights_fail_cleanly(tmp_path: Path):
    with pytest.raises(ExportFailed, match="unknown model 'nope'"):
        export_model("nope", tmp_path, ExportOptions())
    name = models.list_models()[0]
    with pytest.raises(ExportFailed, match="checkpoint not found"):
        export_model(name, tmp_path, ExportOptions(weights=str(tmp_path / "missing.safetensors")))
    no_weights = [n for n in models.list_models() if not get_entry(n).has_weights]
    if no_weights:
        with pytest.raises(ExportFailed, match="has no trained weights"):
            export_model(no_weights[0], tmp_path, ExportOptions(weights="default"))


# --- the CLI, as users run it -----------------------------------------------------------------------

CLI_MODEL = "resnet20_cifar" if "resnet20_cifar" in models.list_models() else models.list_models()[0]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )


def _snapshot(repo: Path) -> dict[str, bytes]:
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cli") / "model_repository"
    # pinned: these tests look at the layout of one known variant (`onnx` chooses by measurement otherwise)
    out = _cli(
        "onnx",
        CLI_MODEL,
        "--weights",
        "none",
        "--repository",
        str(repo),
        "--parity-batch-sizes",
        "1",
        "3",
        "--precision",
        "fp32",
        "--runtime",
        "onnxruntime",
    )
    assert out.returncode == 0, out.stderr
    return repo


def test_cli_writes_triton_layout(exported_repo: Path):
    files = sorted(_snapshot(exported_repo))
    expected = {
        f"{CLI_MODEL}/config.pbtxt",
        f"{CLI_MODEL}/model.json",
        f"{CLI_MODEL}/parity.json",
        f"{CLI_MODEL}/1/model.onnx",
    }
    assert expected <= set(files)
    from cnncore.config import load_config

    cfg = load_config(exported_repo / CLI_MODEL)
    assert cfg.backend == "onnxruntime" and cfg.platform == "onnxruntime_onnx"
    assert cfg.dynamic_batching.preferred_batch_size and cfg.instance_group[0].count >= 1


def test_exported_onnx_carries_no_build_machine_paths(exported_repo: Path):
    """The dynamo exporter's per-node stack traces name this checkout's absolute paths; export strips
    them before hashing, so parity.json's hash is the written file's and the bytes do not depend on
    where the repository was built."""
    import json

    import onnx

    from cnncore.artifacts import file_sha256
    from export.onnx_export import BUILD_PATH_KEYS

    served = exported_repo / CLI_MODEL / "1" / "model.onnx"
    proto = onnx.load(str(served))
    assert proto.graph.node and not [
        p.key for n in proto.graph.node for p in n.metadata_props if p.key in BUILD_PATH_KEYS
    ]
    assert any(n.metadata_props for n in proto.graph.node)  # the path-free metadata stays
    assert str(ROOT).encode() not in served.read_bytes()
    parity = json.loads((exported_repo / CLI_MODEL / "parity.json").read_text())
    assert parity["onnx_sha256"] == file_sha256(served) == parity["served"]["onnx_sha256"]
    assert parity["served"]["files"] == {"model.fp32.onnx": parity["onnx_sha256"]}


def test_cli_reexport_is_idempotent(exported_repo: Path):
    before = _snapshot(exported_repo)
    # `repository` with the options the fixture pinned (FP32 on ONNX Runtime) must rewrite nothing.
    out = _cli(
        "repository",
        "--models",
        CLI_MODEL,
        "--weights",
        "none",
        "--repository",
        str(exported_repo),
        "--parity-batch-sizes",
        "1",
        "3",
        "--precision",
        "fp32",
        "--runtime",
        "onnxruntime",
    )
    assert out.returncode == 0, out.stderr
    assert _snapshot(exported_repo) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["onnx", "no_such_model"], "unknown model 'no_such_model'"),
        (["onnx", CLI_MODEL, "--weights", "/nonexistent/ckpt.pth"], "checkpoint not found"),
        (["repository", "--models", CLI_MODEL, "no_such_model", "--weights", "none"], "unknown model 'no_such_model'"),
        # zero tolerance: float32 ONNX Runtime vs eager always differs in the last bits -> parity fails
        (
            ["onnx", CLI_MODEL, "--weights", "none", "--atol", "0", "--rtol", "0", "--parity-batch-sizes", "2"],
            "parity PyTorch vs ONNX Runtime failed",
        ),
    ],
    ids=["bad-name", "missing-checkpoint", "one-bad-name-in-list", "failed-parity"],
)
def test_cli_bad_inputs_leave_repository_untouched(exported_repo: Path, args: list[str], message: str):
    before = _snapshot(exported_repo)
    out = _cli(*args, "--repository", str(exported_repo))
    assert out.returncode == 1
    assert message in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "left untouched" in errors[0]
    assert "Traceback" not in out.stderr
    assert _snapshot(exported_repo) == before
    assert not [p for p in exported_repo.iterdir() if p.name.startswith(".")]


def test_cli_wrong_checkpoint_keys(exported_repo: Path, tmp_path: Path):
    from safetensors.torch import save_file

    bad = tmp_path / "wrong.safetensors"
    save_file({"not_a_layer.weight": torch.zeros(2)}, str(bad))
    before = _snapshot(exported_repo)
    out = _cli("onnx", CLI_MODEL, "--weights", str(bad), "--repository", str(exported_repo))
    assert out.returncode == 1 and "cannot load weights" in out.stderr and "Traceback" not in out.stderr
    assert _snapshot(exported_repo) == before


def test_cli_list():
    out = _cli("list")
    assert out.returncode == 0, out.stderr
    for name in models.list_models():
        assert name in out.stdout


def test_parity_tolerance_is_the_entrys_own_unless_given(tmp_path):
    """ResNet-152's registry entry carries a looser parity tolerance (fp32 rounding grows with depth:
    ~4.5e-4 of the output scale there, ~1e-6 for 18-50-layer nets); an explicit --rtol still wins."""
    from export.defaults import DEFAULT_RTOL

    assert get_entry("resnet152").parity_rtol == 1e-3 and get_entry("resnet50").parity_rtol is None
    outcome = export_model("fashion_resnet20", tmp_path, ExportOptions(parity_batch_sizes=[1]))
    assert outcome.parity.rtol == DEFAULT_RTOL
    outcome = export_model("fashion_resnet20", tmp_path, ExportOptions(parity_batch_sizes=[1], rtol=5e-3))
    assert outcome.parity.rtol == 5e-3
