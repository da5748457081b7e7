"""Architecture cards: layer table, parameters, MACs/FLOPs and receptive field of an nn.Module.

Two walks, each where it is exact:
- The layer table (output shapes, parameters, MACs) comes from forward hooks on leaf modules during
  one real forward pass at the entry's input size, so shapes are what the model actually produces.
- The receptive field comes from a torch.fx symbolic trace: it needs the dataflow graph (a residual
  add joins two paths; a 1x1 stride-2 shortcut must not compound with the main path's strides), which
  forward hooks in execution order cannot see. Models that do not trace (data-dependent control flow,
  e.g. detection) get no receptive field rather than a wrong one.

Conventions: MACs count multiply-accumulates of Conv/ConvTranspose/Linear (the arithmetic that
dominates); FLOPs = 2 x MACs. Receptive field is the theoretical one along the spatial axes, in input
pixels, of the deepest feature map before any global pooling (or flattening).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass
class Card:
    model: str
    input_shape: tuple[int, ...]  # (C, H, W), batch 1
    layers: list[LayerRow]
    params: int
    trainable_params: int
    macs: int
    receptive_field: int | None
    receptive_field_method: str = "torch.fx symbolic trace"
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-accumulates of one leaf module for one forward (batch included)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        k = math.prod(module.kernel_size)
        return out.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # every input element scatters into out_channels/groups x kernel outputs
        k = math.prod(module.kernel_size)
        return inp.numel() * (module.out_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def _shape(out) -> tuple[int, ...]:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return tuple(out[0].shape)
    if isinstance(out, dict) and out:
        first = next(iter(out.values()))
        return tuple(first.shape) if isinstance(first, torch.Tensor) else ()
    return ()


def layer_table(module: nn.Module, input_shape: Sequence[int], example: torch.Tensor | None = None) -> list[LayerRow]:
    """One forward at batch 1 with hooks on every leaf module (modules without children)."""
    rows: list[LayerRow] = []
    handles = []

    def hook(name: str):
        def fn(mod: nn.Module, args, out) -> None:
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            first = out if isinstance(out, torch.Tensor) else None
            macs = layer_macs(mod, inp, first) if inp is not None and first is not None else 0
            rows.append(
                LayerRow(
                    name, type(mod).__name__, _shape(out), sum(p.numel() for p in mod.parameters(recurse=False)), macs
                )
            )

        return fn

    for name, mod in module.named_modules():
        if not any(True for _ in mod.children()):  # leaves only (the root itself when it is a single layer)
            handles.append(mod.register_forward_hook(hook(name or type(mod).__name__)))
    x = example if example is not None else torch.randn(1, *input_shape)
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return rows


# --- receptive field -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RF:
    """Receptive field size r (input pixels) and jump j (input pixels between adjacent outputs)."""

    r: float
    j: float
    is_global: bool = False


def _rf_through(module: nn.Module, rf: RF) -> RF:
    if rf.is_global:
        return rf
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d)):
        k = _pair(module.kernel_size)[0]
        s = _pair(module.stride if module.stride is not None else k)[0]
        d = _pair(getattr(module, "dilation", 1))[0]
        return RF(rf.r + (k - 1) * d * rf.j, rf.j * s)
    if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose1d)):
        # each output sees ceil(k/s) input positions along an axis
        k, s = _pair(module.kernel_size)[0], _pair(module.stride)[0]
        d = _pair(module.dilation)[0]
        span = math.ceil(((k - 1) * d + 1) / s)
        return RF(rf.r + (span - 1) * rf.j, rf.j / s)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = _pair(module.output_size)
        if size == (1, 1):
            return RF(rf.r, rf.j, is_global=True)
        return rf
    if isinstance(module, nn.Upsample):
        f = module.scale_factor
        f = f[0] if isinstance(f, (tuple, list)) else f
        return RF(rf.r, rf.j / f) if f else rf
    if isinstance(module, (nn.Flatten, nn.Linear)):
        return RF(rf.r, rf.j, is_global=True)
    return rf


def receptive_fields(module: nn.Module) -> list[tuple[str, RF]]:
    """RF after every fx node, in graph order; raises if the module does not trace."""
    gm = fx.symbolic_trace(module)
    mods = dict(gm.named_modules())
    seen: dict[fx.Node, RF] = {}
    out: list[tuple[str, RF]] = []
    for node in gm.graph.nodes:
        parents = [seen[a] for a in node.all_input_nodes if a in seen]
        if node.op == "placeholder":
            rf = RF(1, 1)
        elif not parents:
            continue
        elif node.op == "call_module":
            rf = _rf_through(mods[node.target], max(parents, key=lambda p: (p.is_global, p.r)))
        else:
            # add / cat / mul / relu / flatten ...: a join sees the union of its inputs' fields
            rf = RF(max(p.r for p in parents), min(p.j for p in parents), any(p.is_global for p in parents))
            fn = getattr(node.target, "__name__", str(node.target))
            if fn in ("flatten", "adaptive_avg_pool2d", "mean") and node.op in ("call_function", "call_method"):
                rf = RF(rf.r, rf.j, is_global=True)
        seen[node] = rf
        out.append((node.name, rf))
    return out


def receptive_field(module: nn.Module) -> int:
    """Theoretical RF (pixels, per spatial axis) of the deepest feature map before global pooling."""
    local = [rf for _, rf in receptive_fields(module) if not rf.is_global]
    if not local:
        raise ValueError("module has no spatial feature map")
    return int(max(rf.r for rf in local))


# --- closed forms the design-fact tests check against real modules ---------------------------------


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, output_padding: int = 0
) -> int:
    """(in-1)*stride - 2*pad + dilation*(k-1) + output_padding + 1."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def build_card(name: str, module: nn.Module, input_shape: Sequence[int], example: torch.Tensor | None = None) -> Card:
    rows = layer_table(module, input_shape, example)
    notes: list[str] = []
    try:
        rf: int | None = receptive_field(module)
    except Exception as exc:  # tracing fails on data-dependent control flow: say so, never guess
        rf = None
        notes.append(f"receptive field not computed: torch.fx could not trace the model ({type(exc).__name__})")
    return Card(
        model=name,
        input_shape=tuple(input_shape),
        layers=rows,
        params=count_params(module),
        trainable_params=count_params(module, trainable_only=True),
        macs=sum(r.macs for r in rows),
        receptive_field=rf,
        notes=notes,
    )


def render_card(card: Card, console=None, max_rows: int | None = None) -> None:
    """Print the card as rich tables (the `describe` command)."""
    from rich.console import Console, JustifyMethod
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{card.model}  input 1x{'x'.join(map(str, card.input_shape))}")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("#", "right"),
        ("layer", "left"),
        ("type", "left"),
        ("output", "left"),
        ("params", "right"),
        ("MACs", "right"),
    )
    for col, just in columns:
        table.add_column(col, justify=just)
    rows = card.layers if max_rows is None else card.layers[:max_rows]
    for i, r in enumerate(rows):
        table.add_row(str(i), r.name, r.kind, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}")
    if max_rows is not None and len(card.layers) > max_rows:
        table.add_row("...", f"({len(card.layers) - max_rows} more)", "", "", "", "")
    console.print(table)
    summary = Table(show_header=False, title="summary")
    summary.add_row("parameters", f"{card.params:,} ({card.trainable_params:,} trainable)")
    summary.add_row("MACs", f"{card.macs:,} ({card.macs / 1e9:.3f} G)")
    summary.add_row("FLOPs (2 x MACs)", f"{card.flops:,} ({card.flops / 1e9:.3f} G)")
    summary.add_row(
        "receptive field",
        f"{card.receptive_field} px ({card.receptive_field_method})" if card.receptive_field is not None else "n/a",
    )
    summary.add_row("layer table", "forward hooks on leaf modules, batch 1")
    for n in card.notes:
        summary.add_row("note", n)
    console.print(summary)
