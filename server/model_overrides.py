"""RepositoryModelLoad / Unload parameters, as Triton's model-repository extension takes them.

Load:
- `config` (string): the model configuration as JSON (model_config.proto's JSON mapping, what
  tritonclient's `load_model(config=...)` sends). It replaces config.pbtxt for this load, whole, as
  Triton's does (fields it leaves out are auto-completed from the model as for a config.pbtxt); the
  next load without one reads config.pbtxt again. Not JSON, or not a ModelConfig: INVALID_ARGUMENT.
- `file:<path>` (bytes; base64 in REST): the model directory's files for this load, e.g.
  `file:1/model.onnx`. As in Triton they replace the directory (the model is loaded from these files
  alone, even a model not in the repository) and need a `config`. They are written to a temporary
  directory that is removed once the backends hold the model.
Unload: `unload_dependents` (bool) is accepted; no model here has dependents (no ensembles).
Anything else is refused with INVALID_ARGUMENT naming the key: never accepted and ignored.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from google.protobuf import json_format

from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
from server.errors import echo, invalid

CONFIG_KEY = "config"
FILE_PREFIX = "file:"
UNLOAD_DEPENDENTS = "unload_dependents"


@dataclass(frozen=True)
class LoadOverride:
    """What one load takes instead of the repository's files."""

    config: mc.ModelConfig | None = None
    files: Mapping[str, bytes] = field(default_factory=dict)  # relative path -> content

    def config_copy(self) -> mc.ModelConfig | None:
        if self.config is None:
            return None
        out = mc.ModelConfig()
        out.CopyFrom(self.config)
        return out

    @contextmanager
    def materialized(self, name: str) -> Iterator[Path]:
        """The override files as a model directory named `name`, removed on exit."""
        with tempfile.TemporaryDirectory(prefix="cnnserve-override-") as tmp:
            model_dir = Path(tmp) / name
            for rel, content in self.files.items():
                path = model_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            model_dir.mkdir(exist_ok=True)
            yield model_dir


def _param_value(p: pb.ModelRepositoryParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_config_json(text: str) -> mc.ModelConfig:
    """A `config` override as Triton parses it: JSON of a ModelConfig, unknown fields refused."""
    cfg = mc.ModelConfig()
    try:
        json_format.Parse(text, cfg)
    except json_format.ParseError as exc:
        raise invalid(f"load parameter 'config' is not a valid model configuration in JSON: {exc}"[:600]) from None
    return cfg


def _file_path(key: str) -> str:
    rel = key[len(FILE_PREFIX) :]
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("..", ".") for p in parts):
        raise invalid(
            f"load parameter {echo(key)}: expected 'file:<version>/<file name>', a path inside the model directory"
        )
    return str(PurePosixPath(*parts))


def check_repository_name(name: str) -> None:
    if name:
        raise invalid(
            f"repository_name {echo(name)}: this server serves one repository, which has no name; leave it empty"
        )


def load_override(request: pb.RepositoryModelLoadRequest) -> LoadOverride | None:
    """The override a RepositoryModelLoad request asks for (None: the repository's files as they are)."""
    check_repository_name(request.repository_name)
    config: mc.ModelConfig | None = None
    files: dict[str, bytes] = {}
    for key in sorted(request.parameters):
        value = _param_value(request.parameters[key])
        if key == CONFIG_KEY:
            if not isinstance(value, str):
                raise invalid("load parameter 'config' must be a string (the model configuration as JSON)")
            config = parse_config_json(value)
        elif key.startswith(FILE_PREFIX):
            if not isinstance(value, bytes):
                raise invalid(f"load parameter {echo(key)} must be bytes (base64 in REST): the file's content")
            files[_file_path(key)] = value
        else:
            raise invalid(
                f"unknown load parameter {echo(key)}; this server takes 'config' and 'file:<version>/<file name>'"
            )
    if files and config is None:
        raise invalid(
            "load parameters 'file:...' need the 'config' parameter too: the override files "
            "replace the model directory, config.pbtxt included"
        )
    if config is None:
        return None
    return LoadOverride(config, files)


def check_unload(request: pb.RepositoryModelUnloadRequest) -> None:
    check_repository_name(request.repository_name)
    for key in request.parameters:
        value = _param_value(request.parameters[key])
        if key != UNLOAD_DEPENDENTS:
            raise invalid(f"unknown unload parameter {echo(key)}; this server takes '{UNLOAD_DEPENDENTS}'")
        if not isinstance(value, bool):
            raise invalid(f"unload parameter '{UNLOAD_DEPENDENTS}' must be a boolean")


def _grpc_parameters(doc: Mapping[str, Any], what: str) -> dict[str, pb.ModelRepositoryParameter]:
    """A REST load/unload body's `parameters` as the gRPC request's map (file contents base64-decoded)."""
    unknown = sorted(set(doc) - {"parameters"})
    if unknown:
        raise invalid(f"{what}: unknown field {echo(unknown[0])}; the body takes 'parameters'")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise invalid(f"{what}: 'parameters' must be an object, got {type(params).__name__}")
    out: dict[str, pb.ModelRepositoryParameter] = {}
    for key, value in params.items():
        if key.startswith(FILE_PREFIX):
            if not isinstance(value, str):
                raise invalid(f"{what}: parameter {echo(key)} must be the file's content in base64")
            try:
                out[key] = pb.ModelRepositoryParameter(bytes_param=base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise invalid(f"{what}: parameter {echo(key)} is not valid base64") from None
        elif isinstance(value, bool):
            out[key] = pb.ModelRepositoryParameter(bool_param=value)
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise invalid(f"{what}: parameter {echo(key)} is out of the int64 range")
            out[key] = pb.ModelRepositoryParameter(int64_param=value)
        elif isinstance(value, str):
            out[key] = pb.ModelRepositoryParameter(string_param=value)
        else:
            raise invalid(
                f"{what}: parameter {echo(key)} must be a string, number or boolean, got {type(value).__name__}"
            )
    return out


def load_request_from_json(model: str, doc: Mapping[str, Any]) -> pb.RepositoryModelLoadRequest:
    return pb.RepositoryModelLoadRequest(model_name=model, parameters=_grpc_parameters(doc, "load request"))


def unload_request_from_json(model: str, doc: Mapping[str, Any]) -> pb.RepositoryModelUnloadRequest:
    return pb.RepositoryModelUnloadRequest(model_name=model, parameters=_grpc_parameters(doc, "unload request"))
