"""Where things are inside one model directory of a Triton-layout repository."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cnncore.artifacts import ONNX_FILENAME
from cnncore.config import CONFIG_FILENAME

if TYPE_CHECKING:
    from cnncore.spec import ModelMeta


def model_names(repository: Path) -> list[str]:
    """The repository's model directories, sorted: those holding a config.pbtxt (staging and backup
    directories the writer leaves for a moment hold none, so they are never listed)."""
    return sorted(p.name for p in Path(repository).iterdir() if (p / CONFIG_FILENAME).is_file())


def version_numbers(model_dir: Path) -> list[int]:
    """The model's version directories, ascending: positive integer names only, as Triton counts them."""
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def latest_version_dir(model_dir: Path) -> Path:
    """The newest version directory of a model; FileNotFoundError naming the model when it has none."""
    versions = version_numbers(model_dir)
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no numbered version directory")
    return Path(model_dir) / str(versions[-1])


def latest_onnx(model_dir: Path) -> tuple[Path, ModelMeta]:
    """The newest version's model.onnx and the model's model.json, for tools that evaluate what is served.

    FileNotFoundError names what is missing (no such model, no model.json, no version, no ONNX file)."""
    from cnncore.spec import META_FILENAME, ModelMeta

    model_dir = Path(model_dir)
    if not (model_dir / META_FILENAME).is_file():
        raise FileNotFoundError(f"{model_dir}: no {META_FILENAME} (not a model written by `python -m export`)")
    path = latest_version_dir(model_dir) / ONNX_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path, ModelMeta.read(model_dir)
