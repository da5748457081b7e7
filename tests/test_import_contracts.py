"""Which package may import which, as pyproject.toml's [tool.importlinter] contracts say, checked with
import-linter itself (`lint-imports`): server imports neither models, export nor client, and torch only
in its torch backend; client imports no server, models, export or torch; models and export import no
server or client; cnncore and protos import none of the others and no torch; server and cnncore import
none of the offline half's libraries (onnx, nncf, safetensors, rich); inside server the layers hold
(bindings above the data plane above scheduling above the backends)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} missing: install the dev extra (bash scripts/setup.sh)"
    # --no-cache: nothing written into the checkout. cwd first on the path: the packages analysed are
    # the ones in `cwd`, not an installed copy.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_package_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "7 kept" in proc.stdout


def _package(root: Path, dotted: str, source: str = "") -> None:
    path = root.joinpath(*dotted.split("."))
    path.mkdir(parents=True, exist_ok=True)
    (path / "__init__.py").write_text(source)


def test_the_contracts_catch_a_forbidden_import(tmp_path):
    """The same contracts on a miniature tree that breaks four of them: the check is not vacuous."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for name in ("protos", "client", "export", "rich"):
        _package(tmp_path, name)
    _package(tmp_path, "cnncore", "import rich\n")  # an offline-half library in the serving core
    _package(tmp_path, "server.bindings")
    _package(tmp_path, "server.scheduling", "from server import bindings\n")  # a lower layer importing a higher
    _package(tmp_path, "models", "import torch\n")
    _package(tmp_path, "torch")  # stands in for the external package: what matters is who imports it
    _package(tmp_path, "server", "from server.backends import torch_program\n")
    _package(tmp_path, "server.backends")
    (tmp_path / "server" / "backends" / "torch_program.py").write_text("def load():\n    import torch\n")
    (tmp_path / "server" / "model.py").write_text("import torch\nfrom models import registry\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "Contracts: 3 kept, 4 broken." in proc.stdout
    assert "server.model -> models" in proc.stdout and "server.model -> torch" in proc.stdout
    assert "cnncore -> rich" in proc.stdout and "server.scheduling -> server.bindings" in proc.stdout
    assert "torch_program -> torch" not in proc.stdout.split("Broken contracts")[-1]  # the one allowed import
