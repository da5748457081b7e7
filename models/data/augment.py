"""The augmentation policy for Fashion-MNIST, written as data and checked before it is used.

An augmentation is only useful if the label is still true afterwards. The classic failure is digits:
rotate a 6 by 180 degrees and it is a 9 still labelled 6, so the net learns noise. For garments the
question is which transforms produce an image that could have come from the same photo studio with
the same class: Fashion-MNIST products are photographed upright, centred, light-on-black, at one
scale. ALLOWED lists each transform we apply with the range that keeps the label; FORBIDDEN lists the
tempting ones with the reason they are not label-safe. `AugmentPolicy` refuses a forbidden transform
or an allowed one outside its range, so a careless recipe change fails loudly instead of quietly
costing accuracy.

Transforms run on a whole batch of torch tensors [N, C, H, W] in [0, 1] (before normalisation, so the
padding value 0 is the dataset's black background), driven by an explicit torch.Generator so a
training run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Allowed:
    why: str
    # parameter name -> (min, max) the label survives
    ranges: Mapping[str, tuple[float, float]]


ALLOWED: Mapping[str, Allowed] = {
    "hflip": Allowed(
        why="left-right is not part of any class: a mirrored sneaker is still a sneaker. The dataset's "
        "shoes all face one way (>99% of sneakers and boots, measured), photos sent to the server do not",
        ranges={"p": (0.0, 1.0)},
    ),
    "translate": Allowed(
        why="pad with background and crop back to 28x28: shifts of a few pixels keep the whole "
        "product in frame; centring varies a little in the data anyway",
        ranges={"max_shift": (1, 3)},
    ),
}

FORBIDDEN: Mapping[str, str] = {
    "vflip": "an upside-down product never occurs and flips what identifies some classes: a boot's "
    "shaft or a dress's flare ends up at the wrong end (the 6-becomes-9 trap)",
    "rotate": "products are photographed upright; large rotations turn a trouser into a horizontal "
    "shape and make a sandal look like a bag, and we gain nothing the test set contains",
    "transpose": "swaps height and width: a rotation plus flip, with the same problems as both",
    "invert": "the data is light-on-black; inverting swaps foreground and background, a distribution "
    "the model is never fed (serving inverts photos once, in preprocessing, instead)",
    "scale_crop": "crops that cut the product away remove what separates classes: sleeve length "
    "(T-shirt vs shirt vs pullover vs coat), shaft height (sneaker vs ankle boot)",
    "mixup": "blends two products into one image whose hard label is then false",
    "cutmix": "pastes part of another product in; the hard label no longer names what is shown",
}


class ForbiddenTransform(ValueError):
    """A transform that does not keep the label (see FORBIDDEN for the reason)."""


@dataclass(frozen=True)
class Op:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


def _validate(op: Op) -> None:
    if op.name in FORBIDDEN:
        raise ForbiddenTransform(f"{op.name!r} is forbidden for Fashion-MNIST: {FORBIDDEN[op.name]}")
    if op.name not in ALLOWED:
        raise ValueError(f"unknown transform {op.name!r}; allowed: {', '.join(ALLOWED)}")
    ranges = ALLOWED[op.name].ranges
    unknown = set(op.params) - set(ranges)
    if unknown:
        raise ValueError(f"{op.name}: unknown parameters {sorted(unknown)}; expected {sorted(ranges)}")
    for key, (lo, hi) in ranges.items():
        if key not in op.params:
            raise ValueError(f"{op.name}: missing parameter {key!r}")
        value = op.params[key]
        if not lo <= value <= hi:
            raise ForbiddenTransform(
                f"{op.name}.{key}={value} is outside the label-safe range [{lo}, {hi}]: {ALLOWED[op.name].why}"
            )


def _hflip(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=gen) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def _translate(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    s = int(max_shift)
    n, _, h, w = x.shape
    padded = F.pad(x, (s, s, s, s), value=0.0)
    # Each image gets its own crop offset: gather rows/cols of the padded batch in one indexing op.
    dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {"hflip": _hflip, "translate": _translate}


class AugmentPolicy:
    """An ordered list of validated ops; construction fails on anything not label-safe."""

    def __init__(self, ops: list[Op] | tuple[Op, ...]) -> None:
        for op in ops:
            _validate(op)
        self.ops: tuple[Op, ...] = tuple(ops)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch [N, C, H, W], got shape {tuple(x.shape)}")
        for op in self.ops:
            x = _IMPLEMENTATIONS[op.name](x, gen, **op.params)
        return x

    def describe(self) -> str:
        return ", ".join(f"{op.name}({', '.join(f'{k}={v}' for k, v in op.params.items())})" for op in self.ops)


def default_policy() -> AugmentPolicy:
    """The policy the committed checkpoint was trained with.

    Mild on purpose: the recipe runs only a few epochs, where the net is still underfitting and
    strong augmentation costs more accuracy than it buys (longer runs can use max_shift 2-3).
    """
    return AugmentPolicy([Op("hflip", {"p": 0.5}), Op("translate", {"max_shift": 1})])
