"""Batch sizes from the served variant's measured curve (export/batch_sizing.py): the rule on given
curves, the measurement on real runners, and what an export writes into config.pbtxt and model.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnncore.config import load_config
from cnncore.runtime import ort_runner
from cnncore.spec import ModelMeta
from export.batch_sizing import ALWAYS_MEASURED, BatchPins, measure_curve, size_batches

ROOT = Path(__file__).resolve().parents[1]

# images/s by batch, shaped like the default models' on the 2-core box: a knee at 4, flat after
KNEE_AT_4 = {1: 100.0, 2: 150.0, 4: 191.0, 8: 199.0, 16: 200.0, 32: 194.0}


def test_preferred_is_the_smallest_batch_near_the_best_and_max_batch_not_below_8() -> None:
    s = size_batches(KNEE_AT_4, BatchPins(ceiling=32))
    # up to 4 (191 >= 0.9 * 200; 150 is not), and the sizes below it: the batches the batcher may form
    assert s.preferred_batch_sizes == [2, 4]
    assert s.max_batch_size == 8  # client-visible: never below 8 while the ceiling allows it
    assert s.warmup_batch_sizes == [1, 2, 4]
    assert s.max_queue_delay_us == 100  # 1% of 10 ms is 100 us
    assert s.images_per_s == KNEE_AT_4 and s.ceiling == 32
    assert "smallest batch within 10%" in s.rule
    # batching that does not pay: batch 1 alone
    flat = size_batches({1: 290.0, 2: 288.0, 4: 295.0, 8: 293.0}, BatchPins(ceiling=32))
    assert (flat.preferred_batch_sizes, flat.max_batch_size, flat.warmup_batch_sizes) == ([1], 8, [1])


def test_a_knee_above_8_raises_max_batch_to_it_and_the_ceiling_bounds_everything() -> None:
    late = {1: 20.0, 2: 38.0, 4: 70.0, 8: 120.0, 16: 190.0, 32: 199.0}
    s = size_batches(late, BatchPins(ceiling=32))
    assert (s.preferred_batch_sizes, s.max_batch_size, s.warmup_batch_sizes) == ([2, 4, 8, 16], 16, [1, 2, 4, 8, 16])
    assert s.max_queue_delay_us == 500  # 1% of batch 1's 50 ms
    capped = size_batches(late, BatchPins(ceiling=4))
    assert (capped.preferred_batch_sizes, capped.max_batch_size) == ([2, 4], 4)
    assert set(capped.images_per_s) == {1, 2, 4}  # sizes above the ceiling are not the model's


def test_slow_models_cap_the_queue_delay_and_pins_win() -> None:
    s = size_batches({1: 2.0, 2: 3.0}, BatchPins(ceiling=2))
    assert s.max_queue_delay_us == 1000  # 1% of 500 ms would be 5 ms: capped
    pinned = size_batches(KNEE_AT_4, BatchPins(ceiling=32, max_batch_size=32, preferred=(8, 16), queue_delay_us=250))
    assert pinned.max_batch_size == 32 and pinned.preferred_batch_sizes == [8, 16]
    assert pinned.max_queue_delay_us == 250 and pinned.warmup_batch_sizes == [1, 8, 16]
    assert "max_batch_size given" in pinned.rule and "queue delay given" in pinned.rule
    # nothing measured (no runner): min(8, ceiling), the floor delay
    blind = size_batches({}, BatchPins(ceiling=32))
    assert (blind.preferred_batch_sizes, blind.max_batch_size, blind.max_queue_delay_us) == ([8], 8, 100)


def _affine(path: Path, width: int) -> Path:
    """y = x @ W: its cost grows with the batch, so its curve has a top to find."""
    w = np.random.default_rng(0).standard_normal((width, width)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["out"])],
        "affine",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_measure_curve_climbs_within_the_ceiling_and_keeps_known_figures(tmp_path: Path) -> None:
    run = ort_runner(_affine(tmp_path / "a.onnx", 64))
    sample = np.zeros(64, np.float32)
    curve = measure_curve(run, sample, 4, {1: 1e12, 16: 5.0}, seconds=0.03, rounds=2)
    assert sorted(curve) == [1, 2, 4]  # the known batch 16 lies above the ceiling: dropped
    assert curve[1] == 1e12  # a figure measured before and higher is kept (best of)
    assert all(r > 0 for r in curve.values())
    # sizes up to ALWAYS_MEASURED are measured whatever the curve; the budget stops the climb
    full = measure_curve(run, sample, 32, seconds=0.03, rounds=1)
    assert {1, 2, 4, ALWAYS_MEASURED} <= set(full) <= {1, 2, 4, 8, 16, 32}
    assert sorted(measure_curve(run, sample, 32, seconds=0.03, rounds=1, budget_s=0.0)) == [1]


def test_export_writes_the_measured_sizes_into_config_and_model_json(tmp_path: Path) -> None:
    """A real export (fashion_resnet20, FP32 on ONNX Runtime): the config's batching is the rule applied
    to the curve model.json records, the config says why, and `describe` prints both."""
    repo = tmp_path / "repo"
    cmd = [sys.executable, "-m", "export"]
    common = ["--repository", str(repo), "--precision", "fp32", "--runtime", "onnxruntime"]
    out = subprocess.run(
        [*cmd, "onnx", "fashion_resnet20", "--parity-batch-sizes", "1", *common],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    cfg = load_config(repo / "fashion_resnet20")
    meta = ModelMeta.read(repo / "fashion_resnet20")
    assert meta.serving is not None and meta.serving.batching is not None
    sizing = meta.serving.batching
    from models.registry import get_entry

    assert {1, 2, 4, 8} <= set(sizing.images_per_s) and sizing.ceiling == get_entry("fashion_resnet20").max_batch_size
    assert size_batches(sizing.images_per_s, BatchPins(ceiling=sizing.ceiling)) == sizing  # the rule, recorded
    assert cfg.max_batch_size == sizing.max_batch_size >= 8
    assert list(cfg.dynamic_batching.preferred_batch_size) == sizing.preferred_batch_sizes
    assert cfg.dynamic_batching.max_queue_delay_microseconds == sizing.max_queue_delay_us
    assert [w.batch_size for w in cfg.model_warmup] == sizing.warmup_batch_sizes
    assert "images/s by batch" in cfg.parameters["batch_sizing"].string_value
    # an explicit --max-batch-size wins over the rule
    pinned = subprocess.run(
        [*cmd, "onnx", "fashion_resnet20", "--parity-batch-sizes", "1", "--max-batch-size", "4", *common],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pinned.returncode == 0, pinned.stderr
    cfg4 = load_config(repo / "fashion_resnet20")
    assert cfg4.max_batch_size == 4 and max(cfg4.dynamic_batching.preferred_batch_size) <= 4
    desc = subprocess.run(
        [*cmd, "describe", "fashion_resnet20", "--repository", str(repo), "--rss"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert desc.returncode == 0, desc.stderr
    assert "batching: preferred" in desc.stdout and "max_batch_size 4" in desc.stdout
    line = next(ln for ln in desc.stdout.splitlines() if "resident memory" in ln)
    added = float(line.split("+", 1)[1].split(" MiB")[0])
    assert added > 0  # a loaded, warmed-up model holds memory the empty server does not


@pytest.mark.parametrize("ceiling", [1, 3])
def test_small_ceilings_are_kept(ceiling: int) -> None:
    s = size_batches({1: 10.0, 2: 18.0, 3: 19.0}, BatchPins(ceiling=ceiling))
    assert s.max_batch_size == ceiling and max(s.preferred_batch_sizes) <= ceiling
