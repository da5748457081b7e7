"""Where things are inside one model directory of a Triton-layout repository."""
from __future__ import annotations

from pathlib import Path


def version_numbers(model_dir: Path) -> list[int]:
    """The model's version directories, ascending: positive integer names only, as Triton counts them."""
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def latest_version_dir(model_dir: Path) -> Path:
    """The newest version directory of a model; FileNotFoundError naming the model when it has none."""
    versions = version_numbers(model_dir)
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no numbered version directory")
    return Path(model_dir) / str(versions[-1])
