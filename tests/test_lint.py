"""The tree passes its own lint, format and type checks, as pyproject.toml configures them ([tool.ruff],
[tool.mypy]): `ruff check`, `ruff format --check` and `mypy` from the repository root, the same commands
.pre-commit-config.yaml runs. A failure prints the tool's own report.

The probes run the same configuration on a miniature tree, so a setting that quietly stopped applying
(strictness leaking to every module, or none; the generated protos no longer excluded) fails here too.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# mypy's incremental cache, outside the checkout and one per checkout: a warm cache makes the check a few
# seconds (the fast lane runs it), and two checkouts never share module entries.
MYPY_CACHE = Path(tempfile.gettempdir()) / f"cnnserve-mypy-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"


def _tool(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = BIN / name
    assert exe.is_file(), f"{exe} missing: install the dev extra (bash scripts/setup.sh)"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def _report(proc: subprocess.CompletedProcess[str], keep: int = 200) -> str:
    """The tool's output, its last `keep` lines when longer (the summary lines come last)."""
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    head = [f"... {len(lines) - keep} lines above left out"] if len(lines) > keep else []
    return "\n".join(head + lines[-keep:])


# --no-cache / a cache directory elsewhere: nothing is written into the checkout.
def test_ruff_check_is_clean() -> None:
    proc = _tool("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert proc.returncode == 0, _report(proc)


def test_ruff_format_is_clean() -> None:
    proc = _tool("ruff", "format", "--check", "--no-cache", "--output-format", "concise", ".")
    assert proc.returncode == 0, _report(proc)


def test_mypy_is_clean() -> None:
    proc = _tool("mypy", "--cache-dir", str(MYPY_CACHE))
    assert proc.returncode == 0, _report(proc)


@pytest.fixture
def probe_tree(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    untyped = "def scale(x, k):\n    return x * k\n"
    for package in ("cnncore", "models", "protos"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "cnncore" / "probe.py").write_text(untyped)
    (tmp_path / "models" / "probe.py").write_text(untyped)
    unused_import = "import os\n"
    (tmp_path / "models" / "lint_probe.py").write_text(unused_import)
    (tmp_path / "protos" / "probe_pb2.py").write_text(unused_import)
    return tmp_path


def test_the_configuration_is_strict_where_it_says(probe_tree: Path) -> None:
    proc = _tool("mypy", "--cache-dir", str(probe_tree / "mypy_cache"), "cnncore", "models", cwd=probe_tree)
    assert proc.returncode == 1, _report(proc)
    assert "cnncore/probe.py:1: error: Function is missing a type annotation  [no-untyped-def]" in proc.stdout
    assert "models/probe.py" not in proc.stdout  # the default rules outside cnncore and the data plane

    proc = _tool("ruff", "check", "--no-cache", "--output-format", "concise", ".", cwd=probe_tree)
    assert proc.returncode == 1, _report(proc)
    assert "models/lint_probe.py:1:8: F401" in proc.stdout
    assert "probe_pb2.py" not in proc.stdout  # generated code is not linted
