"""Save a model's `torch.export` ExportedProgram as `<repo>/<model>/<version>/model.pt2`.

The torch backend (server/backends/torch_program.py) runs this program on CUDA on machines without
TensorRT, and on CPU for parity checks. torch.export (not TorchScript) because it is the graph the ONNX
dynamo exporter also starts from, so the served .pt2 and .onnx are the same capture of the model. The
tensor names that config.pbtxt uses travel inside the archive (extra file `cnnserve.json`), since an
ExportedProgram's outputs are positional.

    python -m export.torch_program --repository DIR [--models NAME ...] [--activate [--cuda-graphs]]

`--activate` switches each model's config.pbtxt to `backend: "pytorch"` on KIND_GPU instances (batching
and instance counts kept); `--cuda-graphs` also sets `optimization { cuda { graphs: true } }`, which
replays one captured CUDA graph per batch size instead of launching every op from Python (2.5-3.1x the
eager program's throughput for MobileNetV2 on an H200; README, GPU section).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:
    # Run as a file (`python export/torch_program.py`): Python put export/ itself first on sys.path, where this
    # file's neighbours shadow the packages they belong to (export.py for `export`, tensorrt/ for
    # `tensorrt`). Look modules up from the repository root instead, as `python -m` from there does.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

import torch
from torch import nn

from cnncore.artifacts import PROGRAM_FILENAME, PROGRAM_NAMES_FILE


def export_program(model: nn.Module, example: torch.Tensor, max_batch_size: int) -> torch.export.ExportedProgram:
    """Capture `model` with a dynamic batch dimension in [1, max_batch_size]."""
    model = model.eval()
    if max_batch_size > 1:
        batch = torch.export.Dim("batch", min=1, max=max_batch_size)
        dynamic_shapes = ({0: batch},)
    else:
        dynamic_shapes = None
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)


def save_program(
    program: torch.export.ExportedProgram, path: Path, input_names: Sequence[str], output_names: Sequence[str]
) -> Path:
    path = Path(path)
    names = json.dumps({"inputs": list(input_names), "outputs": list(output_names)})
    tmp = path.with_name(path.stem + ".tmp.pt2")  # torch.export.save wants the .pt2 suffix
    torch.export.save(program, str(tmp), extra_files={PROGRAM_NAMES_FILE: names})
    tmp.replace(path)
    return path


def write_repository_programs(repository: Path, models: Sequence[str] | None = None) -> list[Path]:
    """Export the registry model behind each repository model into its latest version directory."""
    from cnncore.config import load_config
    from cnncore.layout import latest_version_dir, model_names
    from models import get_entry, get_model

    repository = Path(repository)
    names = list(models) if models else model_names(repository)
    written = []
    for name in names:
        model_dir = repository / name
        config = load_config(model_dir)
        entry = get_entry(name)
        model = get_model(name, weights="default" if entry.has_weights else None)
        example = entry.example_inputs(2) if entry.example_inputs else torch.randn(2, *entry.input_shape)
        program = export_program(model, example, max(config.max_batch_size, 1))
        path = save_program(
            program,
            latest_version_dir(model_dir) / PROGRAM_FILENAME,
            [i.name for i in config.input],
            [o.name for o in config.output],
        )
        print(f"{name}: wrote {path}", file=sys.stderr)
        written.append(path)
    return written


def activate_pytorch(model_dir: Path, cuda_graphs: bool = False) -> Path:
    """Serve `model_dir` with the torch backend on the GPU (its model.pt2), CUDA graphs if asked."""
    from cnncore.config import load_config, retarget_to_gpu, write_config

    config = retarget_to_gpu(load_config(model_dir), "pytorch")
    if cuda_graphs:
        config.optimization.cuda.graphs = True
    return write_config(config, model_dir)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.torch_program", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", required=True, type=Path)
    ap.add_argument("--models", nargs="*")
    ap.add_argument(
        "--activate", action="store_true", help='switch each config.pbtxt to backend "pytorch" on KIND_GPU instances'
    )
    ap.add_argument("--cuda-graphs", action="store_true", help="with --activate: optimization.cuda.graphs")
    args = ap.parse_args(argv)
    if args.cuda_graphs and not args.activate:
        ap.error("--cuda-graphs needs --activate")
    for path in write_repository_programs(args.repository, args.models):
        if args.activate:
            model_dir = path.parent.parent
            activate_pytorch(model_dir, args.cuda_graphs)
            print(
                f"{model_dir.name}: config.pbtxt -> backend pytorch, KIND_GPU"
                + (", CUDA graphs" if args.cuda_graphs else ""),
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
