"""`python -m export`: registry models -> checked ONNX -> Triton-layout model repository.

python -m export list
python -m export describe resnet18
python -m export onnx mobilenet_v2 --repository model_repository --version 1
python -m export repository                     # every served_by_default model, fastest gated variant
python -m export quantize mobilenet_v2          # QDQ INT8 behind the accuracy gate
python -m export lint some_model.onnx
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if not __package__:
    # Run as a file (`python export/export.py`): Python put export/ itself first on sys.path, where this
    # file's neighbours shadow the packages they belong to (export.py for `export`, tensorrt/ for
    # `tensorrt`). Look modules up from the repository root instead, as `python -m` from there does.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from export.defaults import DEFAULT_REPOSITORY


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    # piped output (CI logs, tests) would otherwise wrap tables at 80 columns
    return console if console.is_terminal else Console(highlight=False, width=160)


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


@contextlib.contextmanager
def _step_factory(console):
    """A rich status spinner per long step, and a timing line when it ends."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as progress:

        @contextlib.contextmanager
        def step(desc: str):
            task = progress.add_task(desc, total=None)
            t0 = time.perf_counter()
            try:
                yield
            finally:
                progress.remove_task(task)
            console.print(f"[green]done[/] {desc} [dim]({time.perf_counter() - t0:.1f}s)[/]")

        yield step


def _load_registry():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    import models  # noqa: F401  (registers every family)
    from models import registry

    return registry


# --- subcommands ----------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    registry = _load_registry()
    repo = Path(args.repository)
    table = Table(title=f"registry models (served: what {repo} holds)")
    for col in ("name", "task", "input (CxHxW)", "served by default", "weights", "max batch", "served", "gate"):
        table.add_column(col)
    for name in registry.list_models():
        e = registry.get_entry(name)
        served, gate = _served_summary(repo, name)
        if args.served and not served:
            continue
        table.add_row(
            name,
            e.task.value,
            "x".join(map(str, e.input_shape)),
            "yes" if e.served_by_default else "no",
            "yes" if e.has_weights else "no",
            str(e.max_batch_size),
            served,
            gate,
        )
    _console().print(table)
    return 0


def _served_summary(repo: Path, name: str) -> tuple[str, str]:
    """(precision/runtime, gate figures) of `name` in the repository, from its model.json; '' if absent."""
    from cnncore.spec import META_FILENAME, ModelMeta

    if not (repo / name / META_FILENAME).is_file():
        return "", ""
    try:
        serving = ModelMeta.read(repo / name).serving
    except Exception as exc:
        return f"unreadable model.json: {exc}".splitlines()[0], ""
    if serving is None:
        return "fp32/onnxruntime", ""
    gate = ", ".join(
        f"{f.metric}: {(f.variant or 'int8').split('/')[0].upper()} {f.int8:.4g} vs FP32 {f.fp32:.4g}"
        f"{'' if f.passed else ' (refused)'}"
        for f in serving.gate
    )
    return f"{serving.precision}/{serving.runtime}", gate


def cmd_describe(args: argparse.Namespace) -> int:
    registry = _load_registry()
    from export.card import build_card, render_card
    from export.onnx_export import example_batch

    try:
        entry = registry.get_entry(args.name)
    except KeyError as exc:
        return _err(str(exc.args[0]))
    model = registry.get_model(args.name, weights=None)
    card = build_card(args.name, model, entry.input_shape, example_batch(entry, 1, seed=0))
    console = _console()
    render_card(card, console, max_rows=None if args.all else 60)
    _describe_serving(console, Path(args.repository), args.name)
    if args.rss:
        return _describe_rss(console, Path(args.repository), args.name)
    return 0


def _describe_rss(console, repo: Path, name: str) -> int:
    from export.server_rss import RssUnavailable, served_rss

    if not (repo / name).is_dir():
        return _err(f"--rss: {name} is not in {repo}")
    try:
        rss = served_rss(repo, name)
    except RssUnavailable as exc:
        return _err(f"--rss: {exc}")
    console.print(
        f"  resident memory (measured now, VmRSS of `python -m server` once ready, after warm-up): "
        f"+{rss.model_mib:.0f} MiB ({rss.loaded_mib:.0f} MiB with only {name}, {rss.empty_mib:.0f} MiB with no "
        f"model; ready in {rss.ready_s:.2f} s; load average {os.getloadavg()[0]:.1f})"
    )
    return 0


def _describe_serving(console, repo: Path, name: str) -> None:
    from cnncore.spec import META_FILENAME, ModelMeta

    if not (repo / name / META_FILENAME).is_file():
        console.print(f"not in {repo}")
        return
    serving = ModelMeta.read(repo / name).serving
    if serving is None:
        console.print(f"served from {repo}: FP32 on onnxruntime (written before precision selection)")
        return
    console.print(f"served from {repo}: [bold]{serving.precision.upper()} on {serving.runtime}[/] ({serving.reason})")
    if serving.calibration:
        console.print(f"  calibration: {serving.calibration}")
    from export.accuracy_gate import describe

    for f in serving.gate:
        console.print(f"  gate {'[green]passed[/]' if f.passed else '[red]refused[/]'}: {describe(f)} on {f.held_out}")
    if serving.throughput:
        where = f" (on {serving.cpu.summary()})" if serving.cpu else ""
        console.print(
            f"  images/s measured{where}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(serving.throughput.items()))
        )
    for v in serving.variants:
        needs = f", needs {'/'.join(v.needs)}" if v.needs else ""
        console.print(f"  gated variant {v.precision}/{v.runtime}: {v.file} {v.images_per_s:g} img/s{needs}")
    if serving.batching is not None:
        b = serving.batching
        curve = ", ".join(f"{k}: {r:g}" for k, r in sorted(b.images_per_s.items())) or "not measured"
        console.print(
            f"  batching: preferred {b.preferred_batch_sizes}, max_batch_size {b.max_batch_size}, queue delay "
            f"{b.max_queue_delay_us} us, warm-up at {b.warmup_batch_sizes}"
        )
        console.print(f"  images/s by batch of {serving.precision}/{serving.runtime} (export machine): {curve}")
        console.print(f"  why: {b.rule}")


def _options(args: argparse.Namespace):
    from export.accuracy_gate import GateThresholds
    from export.pipeline import ExportOptions
    from export.repository import BatchingDefaults
    from export.variants import VariantOptions

    return ExportOptions(
        weights=args.weights,
        version=args.version,
        opset=args.opset,
        max_batch_size=args.max_batch_size,
        parity_batch_sizes=args.parity_batch_sizes,
        atol=args.atol,
        rtol=args.rtol,
        lint=not args.no_lint,
        input_dtype=args.input_dtype,
        batching=BatchingDefaults(max_queue_delay_microseconds=args.max_queue_delay_us, instance_count=args.instances),
        variant=VariantOptions(
            precision=args.precision,
            runtime=args.runtime,
            thresholds=GateThresholds(
                accuracy_points=args.gate_accuracy, map50=args.gate_map, miou=args.gate_miou, mse_relative=args.gate_mse
            ),
            remeasure=args.remeasure,
        ),
    )


def _print_outcome(console, outcome) -> None:
    from rich.table import Table

    table = Table(title=f"{outcome.staged.name}: parity PyTorch eager vs ONNX Runtime (CPU)")
    for col in ("batch", "output", "max abs", "max rel", "tolerance", "ok"):
        table.add_column(col, justify="right")
    for r in outcome.parity.results:
        tol = "entry's parity_check" if outcome.parity.custom_check else f"{r.tolerance:.3g}"
        table.add_row(
            str(r.batch_size),
            r.output,
            f"{r.max_abs:.3g}",
            f"{r.max_rel:.3g}",
            tol,
            "[green]yes[/]" if r.ok else "[red]NO[/]",
        )
    console.print(table)
    lint = outcome.lint
    console.print(
        f"TensorRT {lint.tensorrt_version} lint: {'[green]ok[/]' if lint.ok else '[red]FAILED[/]'} "
        f"({lint.node_count} nodes, ops: {', '.join(sorted(lint.op_types))})"
    )
    serving = outcome.staged.meta.serving
    if serving is not None and serving.batching is not None:
        from export.batch_sizing import describe_sizing

        console.print(f"batching: {describe_sizing(serving.batching)}")


def _export_into(repo: Path, names: Sequence[str], args: argparse.Namespace) -> int:
    from cnncore.artifacts import ONNX_FILENAME
    from export.pipeline import ExportFailed, export_model
    from export.repository import write_models

    console = _console()
    options = _options(args)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="cnnserve-export-") as work, _step_factory(console) as step:
        for name in names:
            try:
                outcome = export_model(name, Path(work), options, repository=repo, step=step)
            except ExportFailed as exc:
                return _err(f"{exc} (repository {repo} left untouched)")
            _print_outcome(console, outcome)
            outcomes.append(outcome)
        with step(f"write {len(outcomes)} model(s) into {repo}"):
            written = write_models(repo, [o.staged for o in outcomes])
    for path, o in zip(written, outcomes, strict=True):
        serving = o.staged.meta.serving
        served = f", {serving.precision.upper()} on {serving.runtime}: {serving.reason}" if serving else ""
        if serving and serving.cpu:
            served += f"; measured on {serving.cpu.summary()}"
        onnx_file = path / str(o.staged.version) / ONNX_FILENAME
        console.print(f"[bold]{o.staged.name}[/] -> {onnx_file} ({onnx_file.stat().st_size / 1e6:.1f} MB{served})")
    return 0


def cmd_onnx(args: argparse.Namespace) -> int:
    _load_registry()
    return _export_into(Path(args.repository), [args.name], args)


def cmd_repository(args: argparse.Namespace) -> int:
    registry = _load_registry()
    names = args.models or registry.list_models(served_by_default=True)
    if not names:
        return _err("no models to export: the registry has no served_by_default entries")
    if args.weights != "default" and not args.models:
        return _err("--weights other than 'default' needs an explicit --models list")
    unknown = [n for n in names if n not in registry.list_models()]
    if unknown:  # fail before spending minutes exporting the valid ones
        known = ", ".join(registry.list_models())
        return _err(f"unknown model {unknown[0]!r}; known: {known} (repository {args.repository} left untouched)")
    return _export_into(Path(args.repository), names, args)


def cmd_lint(args: argparse.Namespace) -> int:
    import onnx

    from export.trt_lint import lint_model

    path = Path(args.file)
    if not path.is_file():
        return _err(f"no such file: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        return _err(f"{path}: not a readable ONNX model: {exc}")
    report = lint_model(model)
    console = _console()
    console.print(f"{path}: opset {report.opset}, {report.node_count} nodes, TensorRT {report.tensorrt_version} table")
    if report.ok:
        console.print("[green]ok[/]: every node and tensor type is supported")
        return 0
    for issue in report.issues:
        print(f"  {issue}", file=sys.stderr)
    return _err(f"{len(report.issues)} TensorRT compatibility issue(s) in {path}")


# --- parser ---------------------------------------------------------------------------------------


def _add_export_options(p: argparse.ArgumentParser, precision: str = "auto", runtime: str = "auto") -> None:
    from export.defaults import (
        DEFAULT_ATOL,
        DEFAULT_OPSET,
        DEFAULT_RTOL,
        GATE_ACCURACY_POINTS,
        GATE_MAP50,
        GATE_MIOU,
        GATE_MSE_RELATIVE,
        INPUT_DTYPES,
        PRECISION_CHOICES,
        RUNTIME_CHOICES,
    )

    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="model repository dir (default: %(default)s)")
    p.add_argument("--version", type=int, default=1, help="model version directory (default: %(default)s)")
    p.add_argument(
        "--weights",
        default="default",
        help="'default' (the entry's trained weights), 'none' (random init, seed 0) or a checkpoint "
        "path (.safetensors / .pth, torchvision key layout, strict)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, >= 18 (default: %(default)s)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="max_batch_size in config.pbtxt and the exported dynamic range (default: the exported range is "
        "the entry's; config.pbtxt's is sized from the served variant's measured throughput, at least 8)",
    )
    p.add_argument(
        "--parity-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes for the parity check (default: 1 2 3 and max batch)",
    )
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="parity: absolute tolerance (default: %(default)s)")
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help=f"parity: tolerance relative to the output's max magnitude (default: the model's own, "
        f"else {DEFAULT_RTOL})",
    )
    p.add_argument("--no-lint", action="store_true", help="record the TensorRT lint but do not fail on it")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=None,
        help="dynamic_batching.max_queue_delay_microseconds (default: 1%% of the served variant's measured "
        "batch-1 latency, 100 to 1000 us; export/batch_sizing.py)",
    )
    p.add_argument("--instances", type=int, default=1, help="instance_group count, KIND_CPU (default: %(default)s)")
    p.add_argument(
        "--input-dtype",
        choices=INPUT_DTYPES,
        default="fp32",
        help="uint8: the served model takes UINT8 pixels [N,C,H,W] and normalizes them in its graph "
        "(4x fewer bytes per image; checked against the FP32 parent) (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=precision,
        help="served precision: int8 = QDQ INT8 calibrated on real data, bf16 = the FP32 file run in "
        "bfloat16 by OpenVINO, each served only if it passes the accuracy gate; auto = build them "
        "all, serve the fastest that passes on this machine (default: %(default)s)",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default=runtime,
        help="served runtime; auto = measure both here, serve the fastest (default: %(default)s)",
    )
    p.add_argument(
        "--gate-accuracy",
        type=float,
        default=GATE_ACCURACY_POINTS,
        metavar="POINTS",
        help="gate: largest INT8 drop of accuracy / top-1 agreement / retrieval accuracy, in "
        "percentage points (default: %(default)s)",
    )
    p.add_argument(
        "--gate-map", type=float, default=GATE_MAP50, help="gate: largest mAP@0.5 drop (default: %(default)s)"
    )
    p.add_argument("--gate-miou", type=float, default=GATE_MIOU, help="gate: largest mIoU drop (default: %(default)s)")
    p.add_argument(
        "--gate-mse",
        type=float,
        default=GATE_MSE_RELATIVE,
        metavar="FRACTION",
        help="gate: largest relative increase of reconstruction MSE (default: %(default)s)",
    )
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="quantize, measure and gate again even when the repository already holds a choice for "
        "the same FP32 model and options (default: keep it, so re-exports are idempotent)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export registry models to checked ONNX (parity vs PyTorch, TensorRT lint) in a "
        "Triton-layout model repository.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="registry models: task, served by default, weights, served precision/runtime")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="repository to read served variants from")
    p.add_argument("--served", action="store_true", help="only the models the repository serves")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("describe", help="architecture card: layers, output shapes, params, FLOPs, receptive field")
    p.add_argument("name", help="registry model name")
    p.add_argument("--all", action="store_true", help="print every layer (default: the first 60)")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="repository to read the served variant from")
    p.add_argument(
        "--rss",
        action="store_true",
        help="measure the resident memory the model adds to the server: starts the server on the repository "
        "with only this model and with none, and reads VmRSS once ready (after warm-up)",
    )
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("onnx", help="export one model into the repository")
    p.add_argument("name", help="registry model name")
    _add_export_options(p)
    p.set_defaults(func=cmd_onnx)
    p = sub.add_parser("quantize", help="export one model as QDQ INT8 behind the accuracy gate (refused: not written)")
    p.add_argument("name", help="registry model name")
    _add_export_options(p, precision="int8")
    p.set_defaults(func=cmd_onnx)
    p = sub.add_parser("repository", help="build the default repository (all served_by_default models)")
    p.add_argument("--models", nargs="+", default=None, help="export these instead of the default set")
    _add_export_options(p)
    p.set_defaults(func=cmd_repository)
    p = sub.add_parser("lint", help="TensorRT 10 compatibility lint of any ONNX file")
    p.add_argument("file", help="path to a .onnx file")
    p.set_defaults(func=cmd_lint)
    # Parsed by export/tensorrt/cli.py itself (main() hands it the rest of the command line), so the
    # engine builder keeps one definition of its options.
    sub.add_parser(
        "engine", add_help=False, help="TensorRT engines for a repository (GPU + TensorRT); `engine --help` for options"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["engine"]:
        from export.tensorrt.cli import main as engine_main

        return engine_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
