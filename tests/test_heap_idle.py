"""server/heap.py's IdleRelease: the heap is trimmed once the server goes quiet after serving, never while
requests are in flight and never twice for the same quiet spell. Checks are called directly (no timers)."""

from __future__ import annotations

import asyncio

from server.heap import IdleRelease


def test_trims_only_when_quiet_after_serving() -> None:
    activity = {"in_flight": 0, "admitted": 0}
    release = IdleRelease(lambda: (activity["in_flight"], activity["admitted"]))

    async def scenario() -> list[bool]:
        seen = [await release.check()]  # nothing served since start: nothing to give back
        activity.update(in_flight=3, admitted=5)
        seen.append(await release.check())  # serving: never trimmed under load
        activity.update(in_flight=0)
        seen.append(await release.check())  # quiet after serving: trimmed
        seen.append(await release.check())  # still quiet, nothing served since: not again
        activity.update(admitted=6)
        seen.append(await release.check())
        return seen

    assert asyncio.run(scenario()) == [False, False, True, False, True]
    assert release.trims == 2


def test_start_and_stop_leave_no_task() -> None:
    release = IdleRelease(lambda: (0, 0), interval_s=3600)

    async def scenario() -> None:
        release.start()
        await release.stop()
        await release.stop()  # twice is harmless (abandon_start after stop)

    asyncio.run(scenario())
