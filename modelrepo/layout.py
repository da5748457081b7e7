"""Where things are inside one model directory of a Triton-layout repository."""
from __future__ import annotations

from pathlib import Path


def version_numbers(model_dir: Path) -> list[int]:
    """The model's version directories, ascending: positive integer names only, as Triton counts them."""
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)
