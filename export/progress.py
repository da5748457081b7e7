"""The progress callback the export steps report through: called with a step's description, it returns
the context manager the step runs in (the CLI's rich spinner with a timing line; nothing by default)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

Step = Callable[[str], AbstractContextManager[object]]
