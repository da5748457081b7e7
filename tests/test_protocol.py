"""Our protos are wire-compatible with Triton's, and config.pbtxt parsing fails loudly.

tritonclient's generated `inference.*` messages and ours register the same symbols, so the two cannot
be imported into one process: each side's descriptors are dumped to JSON by its own subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnncore.config import ConfigError, load_config, parse_config, render_config, write_config
from protos import model_config_pb2

ROOT = Path(__file__).resolve().parents[1]

# Walks a generated module's file descriptor: every message (nested included) with each field's
# number, type, label, message/enum type and oneof, every enum with its values, every service method.
_DUMP = r"""
import importlib, json, sys
mod = importlib.import_module(sys.argv[1])
fd = mod.DESCRIPTOR
out = {"messages": {}, "enums": {}, "services": {}}
def enum(e):
    out["enums"][e.full_name] = {v.name: v.number for v in e.values}
def msg(m):
    fields = {}
    for f in m.fields:
        fields[f.name] = {
            "number": f.number, "type": f.type, "repeated": f.is_repeated,
            "message": f.message_type.full_name if f.message_type else None,
            "enum": f.enum_type.full_name if f.enum_type else None,
            "oneof": f.containing_oneof.name if f.containing_oneof else None,
        }
    out["messages"][m.full_name] = {"fields": fields, "map_entry": m.GetOptions().map_entry}
    for n in m.nested_types: msg(n)
    for e in m.enum_types: enum(e)
for m in fd.message_types_by_name.values(): msg(m)
for e in fd.enum_types_by_name.values(): enum(e)
for s in fd.services_by_name.values():
    out["services"][s.full_name] = {
        x.name: [x.input_type.full_name, x.output_type.full_name, x.client_streaming, x.server_streaming]
        for x in s.methods
    }
print(json.dumps(out))
"""


def _dump(module: str) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _DUMP, module], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(res.stdout)


def _merge(*dumps: dict) -> dict:
    out: dict = {"messages": {}, "enums": {}, "services": {}}
    for d in dumps:
        for k in out:
            out[k].update(d[k])
    return out


@pytest.fixture(scope="module")
def triton() -> dict:
    return _merge(_dump("tritonclient.grpc.model_config_pb2"), _dump("tritonclient.grpc.service_pb2"))


def _ours_modules() -> list[str]:
    mods = ["protos.model_config_pb2"]
    if (ROOT / "protos" / "grpc_service_pb2.py").exists():
        mods.append("protos.grpc_service_pb2")
    return mods


@pytest.fixture(scope="module")
def ours() -> dict:
    return _merge(*[_dump(m) for m in _ours_modules()])


def test_every_message_matches_triton(ours: dict, triton: dict) -> None:
    assert ours["messages"], "nothing dumped"
    problems = []
    for name, m in ours["messages"].items():
        if name not in triton["messages"]:
            problems.append(f"{name}: not a Triton message")
            continue
        theirs = triton["messages"][name]["fields"]
        for fname, f in m["fields"].items():
            if fname not in theirs:
                problems.append(f"{name}.{fname}: no such field in Triton")
            elif f != theirs[fname]:
                problems.append(f"{name}.{fname}: ours {f} != triton {theirs[fname]}")
    assert not problems, "\n".join(problems)


def test_every_enum_matches_triton(ours: dict, triton: dict) -> None:
    for name, values in ours["enums"].items():
        assert name in triton["enums"], name
        for vname, number in values.items():
            assert triton["enums"][name].get(vname) == number, f"{name}.{vname}"


def test_core_messages_are_defined(ours: dict) -> None:
    # The subset must still cover what the server and perf_analyzer read.
    cfg = ours["messages"]["inference.ModelConfig"]["fields"]
    for f in (
        "name",
        "platform",
        "backend",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "instance_group",
        "optimization",
        "version_policy",
        "parameters",
    ):
        assert f in cfg, f
    for m in (
        "inference.ModelDynamicBatching",
        "inference.ModelInstanceGroup",
        "inference.ModelVersionPolicy",
        "inference.ModelParameter",
        "inference.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator",
    ):
        assert m in ours["messages"], m


def test_service_methods_match_triton(ours: dict, triton: dict) -> None:
    if "protos.grpc_service_pb2" not in _ours_modules():
        pytest.skip("grpc_service.proto not generated yet")
    svc = ours["services"]["inference.GRPCInferenceService"]
    theirs = triton["services"]["inference.GRPCInferenceService"]
    for rpc in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    ):
        assert svc[rpc] == theirs[rpc], rpc


def test_wire_roundtrip_through_tritonclient() -> None:
    """Bytes we serialize parse in tritonclient's classes into the same text form, and back."""
    cfg = parse_config(
        """
        name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
        input [{ name: "x" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [3, 4, 4] }]
        output [{ name: "y" data_type: TYPE_FP16 dims: [-1] label_filename: "labels.txt" }]
        dynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 500
                           default_queue_policy { max_queue_size: 16 } }
        instance_group [{ count: 2 kind: KIND_CPU }]
        version_policy { specific { versions: [1, 3] } }
        optimization { execution_accelerators { gpu_execution_accelerator [
            { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } }] } }
        parameters { key: "intra_op_thread_count" value { string_value: "2" } }
        """
    )
    code = (
        "import sys; from google.protobuf import text_format;"
        "from tritonclient.grpc import model_config_pb2 as m;"
        "c = m.ModelConfig(); c.ParseFromString(sys.stdin.buffer.read());"
        "sys.stdout.write(text_format.MessageToString(c)); sys.stderr.buffer.write(c.SerializeToString())"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], input=cfg.SerializeToString(), capture_output=True, timeout=60, check=True
    )
    assert res.stdout.decode() == render_config(cfg)
    back = model_config_pb2.ModelConfig()
    back.ParseFromString(res.stderr)
    assert back == cfg


def test_config_roundtrip_file(tmp_path: Path) -> None:
    cfg = model_config_pb2.ModelConfig(name="m", backend="onnxruntime", max_batch_size=4)
    inp = cfg.input.add(name="x", data_type=model_config_pb2.TYPE_UINT8)
    inp.dims.extend([1, 28, 28])
    cfg.dynamic_batching.preferred_batch_size.append(4)
    path = write_config(cfg, tmp_path)
    assert path == tmp_path / "config.pbtxt"
    assert load_config(tmp_path) == cfg
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ('name: "m"\nmax_batch_size: 8\nbogus: 1\n', 3, 'no field named "bogus"'),
        ('name: "m"\ninput { name: "x" dims: [1, x] }\n', 2, "Couldn't parse integer"),
        ('name: "m"\ninput { name: "x" data_type: TYPE_FLOAT }\n', 2, "TYPE_FLOAT"),
        ('name: "m"\n\nsequence_batching { }\n', 3, 'no field named "sequence_batching"'),
        ('name: "m"\ninput { name: "x"\n', 2, 'Expected "}"'),
    ],
)
def test_config_errors_name_file_and_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}:"), msg
    assert fragment in msg, msg


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.pbtxt: model config not found"):
        load_config(tmp_path)
