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

Serving leaves freed memory behind too: request and response buffers of hundreds of KB, freed on
threads sharing two arenas, fragment them, so the resident size creeps up with load and stays.
`IdleRelease` trims once the server has gone quiet after serving (nothing in flight at a check, some
requests admitted since the last trim). Measured on the default repository (2 cores, load 2-3): 459 MiB
ready, 523 MiB at the end of a 60 s soak at concurrency 8 (+25 mobilenet_v2, +12 the detector, +11
and +14 the segmenters: the models with 300-800 KB inputs), 507 MiB 5 s later once trimmed; the rest
is not free heap a trim can return (where it sits was not traced). Trimming only when idle costs requests
nothing; a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072: big buffers mapped and unmapped each
time) held the soak at 497 MiB but cut the requests served in the same 60 s by 23-38%, so it is not used.
"""

from __future__ import annotations

import asyncio
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


class IdleRelease:
    """Trims the heap (release_freed_memory, in a worker thread) when a check finds nothing in flight and
    requests admitted since the last trim. `activity` returns (in flight, admitted so far)."""

    def __init__(self, activity: Callable[[], tuple[int, int]], interval_s: float = 2.0) -> None:
        self.activity = activity
        self.interval_s = interval_s
        self.trims = 0
        self._trimmed_at = activity()[1]
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """One check: trims and returns True when the server went quiet after serving."""
        in_flight, admitted = self.activity()
        if in_flight or admitted == self._trimmed_at:
            return False
        self._trimmed_at = admitted
        await asyncio.to_thread(release_freed_memory)
        self.trims += 1
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
