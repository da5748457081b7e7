"""What one repository model costs the server in resident memory, measured, never estimated.

`served_rss` starts the real server (`python -m server`, a separate process: export never imports the
serving half) twice on the repository: once with no model loaded (`--model-control-mode explicit`) and
once with only the model; each time it reads the process's VmRSS from /proc once the ready file says
every model is READY, i.e. after the config's warm-up ran. The model's share is the difference. What it
does not include: the memory a model grows under load beyond its warm-up (benchmarks/bench_cold_start.py
--soak measures that), and the other models' (each is measured alone).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cnncore import loopback


class RssUnavailable(RuntimeError):
    """The server could not be started, or the model did not load: the one-line reason."""


@dataclass(frozen=True)
class ServedRss:
    empty_mib: float  # the server with no model
    loaded_mib: float  # the server with only this model, loaded and warmed up
    ready_s: float  # process start to ready, with this model

    @property
    def model_mib(self) -> float:
        return self.loaded_mib - self.empty_mib


def _server_rss(repo: Path, models: list[str], work: Path, timeout_s: float) -> tuple[float, float]:
    try:
        server = loopback.start(repo, work, models=models, timeout_s=timeout_s)
    except loopback.ServerNotReady as exc:
        raise RssUnavailable(str(exc)) from None
    try:
        return server.rss_mib(), server.ready_s
    finally:
        server.stop(30)


def served_rss(repo: Path, name: str, timeout_s: float = 300.0) -> ServedRss:
    """VmRSS of the server on `repo` with `name` alone, and with no model (see the module docstring)."""
    if not Path(f"/proc/{os.getpid()}/status").is_file():
        raise RssUnavailable("no /proc here: VmRSS is read from /proc/<pid>/status")
    with tempfile.TemporaryDirectory(prefix="rss-") as tmp:
        empty, _ = _server_rss(Path(repo), [], Path(tmp), timeout_s)
        loaded, ready_s = _server_rss(Path(repo), [name], Path(tmp), timeout_s)
    return ServedRss(empty_mib=round(empty, 1), loaded_mib=round(loaded, 1), ready_s=round(ready_s, 2))
