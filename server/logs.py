"""Logs, and Triton's logging extension: what is logged and how, changed while the server runs.

One line per record on stderr (or `log_file`), in one of four formats:
- json (the default): one JSON object per line; fields passed as `extra=` (model, version, reason,
  ports, ...) become keys of the object, so logs can be filtered by model without parsing sentences;
- text: `time LEVEL logger: message [key=value ...]`, for people at a terminal;
- default / ISO8601: Triton's two formats (`I1205 04:36:40.123456 1234 logger] message` and
  `2026-12-05T04:36:40Z I 1234 logger] message`), for tools that parse Triton's logs.

What is logged follows Triton's switches (`--log-info/--log-warning/--log-error`, `--log-verbose N`),
readable and changeable at run time through `GET/POST /v2/logging` and the gRPC LogSettings RPC, with
Triton's setting names: log_file, log_info, log_warnings, log_errors, log_verbose_level, log_format.
Verbose level N is a logging level below DEBUG (`verbose(logger, n, ...)`); level 1 is DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from protos import grpc_service_pb2 as pb
from server.errors import invalid

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
FORMATS = ("json", "text", "default", "ISO8601")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": _level_name(record),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{self.formatTime(record)} {_level_name(record).upper():<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f" [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class TritonFormatter(logging.Formatter):
    """Triton's `default` (glog-like) or `ISO8601` line: level letter, time, pid, source, message."""

    def __init__(self, iso8601: bool) -> None:
        super().__init__()
        self.iso8601 = iso8601

    def format(self, record: logging.LogRecord) -> str:
        letter = "V" if record.levelno < logging.INFO else record.levelname[0]
        t = time.gmtime(record.created) if self.iso8601 else time.localtime(record.created)
        if self.iso8601:
            head = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', t)} {letter} {record.process}"
        else:
            micros = int((record.created % 1) * 1e6)
            head = f"{letter}{time.strftime('%m%d %H:%M:%S', t)}.{micros:06d} {record.process}"
        line = f"{head} {record.name}] {record.getMessage()}"
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        if extras:
            line += f" [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _level_name(record: logging.LogRecord) -> str:
    if record.levelno < logging.INFO:
        return f"verbose{logging.DEBUG - record.levelno + 1}"
    return record.levelname.lower()


def verbose_level(n: int) -> int:
    """The logging level of Triton verbose level n (>= 1): DEBUG for 1, one below per level after."""
    return max(1, logging.DEBUG - (max(1, n) - 1))


def verbose(logger: logging.Logger, n: int, msg: str, *args: Any, **kwargs: Any) -> None:
    """Log `msg` at verbose level n: shown only while log_verbose_level >= n."""
    logger.log(verbose_level(n), msg, *args, **kwargs)


@dataclass
class LogSettings:
    log_file: str = ""
    log_info: bool = True
    log_warnings: bool = True
    log_errors: bool = True
    log_verbose_level: int = 0
    log_format: str = "json"


_TYPES: dict[str, type] = {
    "log_file": str,
    "log_info": bool,
    "log_warnings": bool,
    "log_errors": bool,
    "log_verbose_level": int,
    "log_format": str,
}


class _Switches(logging.Filter):
    """log_info / log_warnings / log_errors: whole severities on or off (verbose is the root's level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        s = SETTINGS
        if record.levelno >= logging.ERROR:
            return s.log_errors
        if record.levelno >= logging.WARNING:
            return s.log_warnings
        if record.levelno >= logging.INFO:
            return s.log_info
        return True


SETTINGS = LogSettings()
_lock = threading.Lock()


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    return TritonFormatter(iso8601=fmt == "ISO8601")


def _install(settings: LogSettings) -> None:
    """Make the root logger follow `settings`: handler (stderr or log_file), format, levels."""
    if settings.log_file:
        try:
            handler: logging.Handler = logging.FileHandler(settings.log_file, encoding="utf-8")
        except OSError as exc:
            raise invalid(
                f"log_file: cannot open {settings.log_file!r:.200} for appending: {exc.strerror or exc}"
            ) from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(settings.log_format))
    handler.addFilter(_Switches())
    root = logging.getLogger()
    old = list(root.handlers)
    root.handlers[:] = [handler]
    for h in old:
        if isinstance(h, logging.FileHandler):
            h.close()
    root.setLevel(verbose_level(settings.log_verbose_level) if settings.log_verbose_level > 0 else logging.INFO)


def checked(updates: Mapping[str, Any]) -> dict[str, Any]:
    """`updates` validated against Triton's setting names and types; InferError (INVALID_ARGUMENT) names
    the first wrong one. Nothing is applied unless every setting is right."""
    out: dict[str, Any] = {}
    for key, value in updates.items():
        kind = _TYPES.get(key)
        if kind is None:
            raise invalid(f"log setting '{key:.64}' is not one of {', '.join(_TYPES)}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise invalid(
                f"log setting '{key}' must be {'uint32' if kind is int else kind.__name__}, got {type(value).__name__}"
            )
        if key == "log_verbose_level" and isinstance(value, int) and not 0 <= value < 2**32:
            raise invalid(f"log setting 'log_verbose_level' must be a non-negative integer, got {value}")
        if key == "log_format" and value not in FORMATS:
            raise invalid(f"log setting 'log_format' must be one of {', '.join(FORMATS)}, got {value!r:.40}")
        out[key] = value
    return out


def update(updates: Mapping[str, Any]) -> dict[str, Any]:
    """Apply Triton log settings (all or none) and answer every current setting, as /v2/logging does."""
    changes = checked(updates)
    with _lock:
        if changes:
            new = LogSettings(**{**asdict(SETTINGS), **changes})
            _install(new)  # raises (nothing changed) when log_file cannot be opened
            for key, value in asdict(new).items():
                setattr(SETTINGS, key, value)
            logging.getLogger("cnnserve.logs").info("log settings changed", extra={"changed": changes})
        return asdict(SETTINGS)


def setup_logging(
    level: str = "info",
    fmt: str = "json",
    *,
    verbose_level: int = 0,
    log_info: bool | None = None,
    log_warnings: bool | None = None,
    log_errors: bool | None = None,
    log_file: str = "",
) -> None:
    """At start: `--log-level` (debug = verbose 1; warning/error turn the lower severities off) and
    Triton's --log-verbose / --log-info / --log-warning / --log-error / --log-file / --log-format."""
    by_level = {
        "debug": (True, True, 1),
        "info": (True, True, 0),
        "warning": (False, True, 0),
        "error": (False, False, 0),
    }[level]
    settings = LogSettings(
        log_file=log_file,
        log_format=fmt,
        log_info=by_level[0] if log_info is None else log_info,
        log_warnings=by_level[1] if log_warnings is None else log_warnings,
        log_errors=True if log_errors is None else log_errors,
        log_verbose_level=max(verbose_level, by_level[2]),
    )
    try:
        _install(settings)
    except Exception as exc:  # an unusable --log-file is a start-up error, said once
        raise SystemExit(f"python -m server: error: --log-file: {getattr(exc, 'message', exc)}") from None
    for key, value in asdict(settings).items():
        setattr(SETTINGS, key, value)


# -- the gRPC LogSettings RPC ------------------------------------------------------------------------------
def settings_rpc(request: pb.LogSettingsRequest) -> pb.LogSettingsResponse:
    updates: dict[str, Any] = {}
    for key, value in request.settings.items():
        which = value.WhichOneof("parameter_choice")
        if which is None:
            raise invalid(f"log setting '{key:.64}' has no value")
        updates[key] = getattr(value, which)
    answer = pb.LogSettingsResponse()
    for key, value in update(updates).items():
        field = {bool: "bool_param", int: "uint32_param", str: "string_param"}[type(value)]
        setattr(answer.settings[key], field, value)
    return answer
