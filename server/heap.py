"""The server's heap: fewer malloc arenas, and freed memory handed back once a model has loaded.

Loading leaves memory behind that the process no longer uses: the graph OpenVINO or ONNX Runtime parsed
and optimised before compiling it, the warm-up's inputs and outputs. glibc keeps such freed blocks in
its arenas (one per thread that allocated, up to 8 per core) for reuse rather than returning them, so
the resident size stays at the load's peak. `malloc_trim(0)` gives back every free page of every arena;
it only releases memory nothing holds, so a later allocation simply maps it again. Elsewhere than glibc
(musl, macOS) there is no such call and nothing happens.

Arenas: glibc gives threads that allocate at the same time their own arena, up to 8 per core, and each
keeps its own freed memory. The server's threads (gRPC, the batcher's execution slots, the loaders, the
runtimes' pools) each fill one with request-sized blocks, so resident memory grows under load with
memory no one holds. `limit_arenas` caps them at MALLOC_ARENAS (2, one per core of the 2-core box),
as MALLOC_ARENA_MAX=2 in the environment would; an explicit MALLOC_ARENA_MAX is left to win. Measured
on the default repository (2 shared cores): after a 60 s soak at concurrency 8, 520 MiB with glibc's
default and 481 MiB with 2 arenas (load 6-8); served at concurrency 8 (load 1.8-2.6) mobilenet_v2 354
/ 332 img/s against 342 / 331 with the default, shapes_detector 113 / 108 against 114 / 107, each
holding 11-23 MiB less afterwards.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable


def _find_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _find_trim()
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at `count` for the rest of the process (arenas made before stay);
    False where the C library has no mallopt or MALLOC_ARENA_MAX is set (the operator's choice wins)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


def release_freed_memory() -> bool:
    """Return the free pages of every malloc arena to the OS; False where the C library has no
    malloc_trim (or it found nothing to release)."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
