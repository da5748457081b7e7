"""Small helpers shared by model families (torchvision keeps the same ones in models/_utils.py)."""

from __future__ import annotations

__all__ = ["_make_divisible"]


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of `divisor`, never going below 90% of `v`.

    From the original TensorFlow MobileNet code: hardware kernels are fastest on channel counts
    divisible by 8, and width multipliers (0.35, 0.75, ...) would otherwise produce odd counts.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # rounding down must not remove more than 10% of the channels
        new_v += divisor
    return new_v
