"""Handing freed heap memory back to the operating system once a model has loaded and warmed up.

Loading leaves memory behind that the process no longer uses: the graph OpenVINO or ONNX Runtime parsed
and optimised before compiling it, the warm-up's inputs and outputs. glibc keeps such freed blocks in
its arenas (one per thread that allocated, up to 8 per core) for reuse rather than returning them, so
the resident size stays at the load's peak. `malloc_trim(0)` gives back every free page of every arena;
it only releases memory nothing holds, so a later allocation simply maps it again. Elsewhere than glibc
(musl, macOS) there is no such call and nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger("cnnserve.heap")


def _find_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _find_trim()


def release_freed_memory() -> bool:
    """Return the free pages of every malloc arena to the OS; False where the C library has no
    malloc_trim (or it found nothing to release)."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
