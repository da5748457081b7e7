"""The command-line half every evaluator shares: which file, which preprocessing and labels, which runtime."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cnncore.layout import latest_onnx
from cnncore.runtime import RUNTIMES, Runner, runner
from cnncore.spec import ModelMeta, PreprocessSpec


@dataclass
class Source:
    path: Path
    spec: PreprocessSpec
    labels: list[str] | None
    meta: ModelMeta | None  # with --repository: the model.json the file was exported with


def add_source_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--onnx", type=Path, help="an exported model.onnx (preprocessing and labels from the registry entry)"
    )
    src.add_argument("--repository", type=Path, help="a model repository written by `python -m export`")
    parser.add_argument("--model", default=default_model, help="registry / repository model name")
    add_runtime_arguments(parser)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help="runtime to measure on")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")


def resolve_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Source:
    """The file and its preprocessing: from the repository's model.json, or from the registry entry."""
    if args.repository is not None:
        try:
            path, meta = latest_onnx(args.repository / args.model)
        except FileNotFoundError as exc:
            parser.error(str(exc))
        return Source(path, meta.preprocess, meta.labels, meta)
    import models  # noqa: F401  (registers the entries)
    from models.registry import get_entry

    entry = get_entry(args.model)
    if not args.onnx.is_file():
        parser.error(f"no such file: {args.onnx}")
    return Source(args.onnx, entry.preprocess, list(entry.labels()) if entry.labels else None, None)


def source_runner(args: argparse.Namespace, path: Path) -> Runner:
    return runner(path, args.runtime, args.threads)
