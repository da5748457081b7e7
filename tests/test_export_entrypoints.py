"""The export CLIs start however a user types them: `python -m export ...` from the repository root, or
the files themselves (`python export/export.py ...`, the tool docs/architecture.md names), from any
directory. Running a file inside export/ puts export/ first on sys.path, where export.py would shadow
the `export` package and export/tensorrt/ the `tensorrt` library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("command", [["-m", "export"], ["export/export.py"]], ids=["module", "file"])
def test_export_help_from_the_repository_root(command):
    out = _run([*command, "--help"], ROOT).stdout
    assert "usage: python -m export" in out and "repository" in out and "engine" in out


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "export", "engine"],
        ["export/export.py", "engine"],
        ["-m", "export.tensorrt"],
        ["-m", "export.torch_program"],
        ["export/torch_program.py"],
    ],
)
def test_sub_tools_help(command):
    out = _run([*command, "--help"], ROOT).stdout
    assert "--repository" in out


def test_export_file_lists_the_registry_from_another_directory(tmp_path):
    out = _run([str(ROOT / "export" / "export.py"), "list"], tmp_path).stdout
    assert "mobilenet_v2" in out and "shapes_detector" in out
