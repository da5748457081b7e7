"""`--model-control-mode poll`: follow the repository on disk, as Triton's poll mode does.

Every `--repository-poll-secs` the repository's directories are fingerprinted (each file's relative path,
size and modification time): a directory that appeared is loaded, one whose fingerprint changed is
reloaded (the loaded copy serves until the new one is ready, `ModelRepository.load`'s rule), and one
that disappeared is unloaded. Loads run in worker threads, so requests to every other model are served
throughout. A model whose files change while being copied in fails to load, and the next poll, seeing
the fingerprint changed again, loads it once it is whole; a failed model whose files did not change is
not retried.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from server.errors import InferError
from server.repository import ModelRepository

log = logging.getLogger("cnnserve.poll")

Fingerprint = frozenset[tuple[str, int, int]]


def fingerprint(model_dir: Path) -> Fingerprint:
    """What a change to a model's directory changes: every file's path, size and mtime (ns)."""
    out = set()
    for root, _dirs, files in os.walk(model_dir):
        for f in files:
            p = Path(root, f)
            try:
                st = p.stat()
            except OSError:  # removed between listing and stat: the next poll sees the result
                continue
            out.add((str(p.relative_to(model_dir)), st.st_size, st.st_mtime_ns))
    return frozenset(out)


def snapshot(root: Path) -> dict[str, Fingerprint]:
    return {p.name: fingerprint(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}


class RepositoryPoller:
    """Created before the initial load (its snapshot is what that load saw at the latest), started after."""

    def __init__(self, repository: ModelRepository, period_s: float) -> None:
        if period_s <= 0:
            raise ValueError(f"poll period must be > 0 s, got {period_s}")
        self.repository = repository
        self.period_s = period_s
        self.seen = snapshot(repository.root)
        self.polls = 0  # completed polls; tests order events by it
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="repository-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repository poll failed")

    async def poll(self) -> None:
        """One pass: load what appeared, reload what changed, unload what disappeared."""
        now = await asyncio.to_thread(snapshot, self.repository.root)
        for name in sorted(set(self.seen) - set(now)):
            # A model that had failed is unloaded too: its failure no longer counts against readiness.
            if name in self.repository.models:
                log.info("model removed from the repository: unloading", extra={"model": name})
                await self.repository.unload(name)
        for name, fp in sorted(now.items()):
            if self.seen.get(name) == fp:
                continue
            log.info(
                "model %s in the repository: loading",
                "changed" if name in self.seen else "added",
                extra={"model": name},
            )
            try:
                await self.repository.load(name)
            except InferError as exc:  # a directory name that is no model name: recorded, not retried
                log.error("model load failed", extra={"model": name, "reason": exc.message})
        self.seen = now
        self.polls += 1
