"""The engine builder's one error type."""

from __future__ import annotations


class BuildError(RuntimeError):
    """The engine could not be built; the message says which model and why."""
