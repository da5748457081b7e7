"""Read and write `config.pbtxt`, Triton's ModelConfig in protobuf text format.

The message is our own wire-compatible copy of Triton's (`protos/model_config.proto`), so a config that
Triton accepts parses here unless it uses a feature this server does not implement; such a config fails
with the file, line and field named rather than being half-understood.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

from protos.model_config_pb2 import ModelConfig

CONFIG_FILENAME = "config.pbtxt"


class ConfigError(ValueError):
    """A config.pbtxt that cannot be parsed; the message names the file and line."""


def parse_config(text: str, source: str = "<string>") -> ModelConfig:
    """Parse config text; `source` names where it came from in error messages."""
    cfg = ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        # ParseError carries line/column when the tokenizer knows them; keep its text too, which
        # names the offending field ("Message type ... has no field named ...").
        where = f"{source}:{exc.GetLine()}" if exc.GetLine() is not None else source
        if exc.GetColumn() is not None:
            where += f":{exc.GetColumn()}"
        detail = re.sub(r"^\d+:\d+ : ", "", str(exc))
        raise ConfigError(f"{where}: invalid model config: {detail}") from None
    return cfg


def load_config(path: str | Path) -> ModelConfig:
    """Load `path` (a config.pbtxt file, or a model directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: model config not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: model config is not UTF-8 text: {exc}") from None
    return parse_config(text, source=str(path))


def render_config(cfg: ModelConfig) -> str:
    """The text form Triton itself writes (one field per line, nested blocks indented)."""
    return text_format.MessageToString(cfg, as_utf8=True)


def write_config(cfg: ModelConfig, path: str | Path) -> Path:
    """Write `cfg` to `path` (a file, or a model directory: then `<dir>/config.pbtxt`)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    path.write_text(render_config(cfg))
    return path


def retarget_to_gpu(cfg: ModelConfig, backend: str) -> ModelConfig:
    """Point `cfg` at a GPU backend in place: `backend` on KIND_GPU instances (counts kept), no platform,
    no default_model_filename (the backend finds its own file), no optimization block (ONNX Runtime's
    execution accelerators mean nothing to another backend). Batching settings stay as they are."""
    from protos.model_config_pb2 import ModelInstanceGroup

    cfg.platform = ""
    cfg.backend = backend
    cfg.default_model_filename = ""
    cfg.ClearField("optimization")
    if not cfg.instance_group:
        cfg.instance_group.add(count=1)
    for group in cfg.instance_group:
        group.kind = ModelInstanceGroup.KIND_GPU
    return cfg
