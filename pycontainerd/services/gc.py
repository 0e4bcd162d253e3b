"""The garbage collector: scheduling, and reclaiming disk space after the metadata sweep.

A collection (1) holds off content commits, (2) marks and deletes unreachable rows in one
metadata transaction (``pycontainerd.metadata.gc``), (3) removes blob files no namespace
holds and the data of dropped ingests, then (4) lets each snapshotter remove the
snapshots no namespace references. Deletions call ``schedule()``, which coalesces
requests into one collection shortly after (containerd's scheduler does the same);
``Delete(sync=true)`` calls ``collect_now()`` and waits. One collection runs at start-up
to reclaim what a crash may have left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from pycontainerd.errdefs import NotFound
from pycontainerd.metadata import gc as gcmeta

if TYPE_CHECKING:
    from pycontainerd.content.metadata import NamespacedContentStore
    from pycontainerd.metadata.db import MetadataDB
    from pycontainerd.snapshots.metadata import SnapshotService

log = logging.getLogger(__name__)


class GarbageCollector:
    def __init__(
        self,
        db: MetadataDB,
        content: NamespacedContentStore,
        snapshots: SnapshotService | None,
        *,
        delay: float = 0.1,
        pause_threshold: float = 0.02,
    ) -> None:
        self._db = db
        self._content = content
        self._snapshots = snapshots
        self._delay = delay
        # Collections may take at most this share of wall time (containerd's
        # pause_threshold): after one that took d seconds, the next waits d / threshold.
        self._pause_threshold = pause_threshold
        self._last_duration = 0.0
        self._last_end = 0.0
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task[None] | None = None
        self.runs = 0

    async def hook(self, sync: bool) -> None:
        """What services call after a deletion: wait for a collection, or ask for one."""
        if sync:
            await self.collect_now()
        else:
            self.schedule()

    def schedule(self) -> None:
        if self._pending is None or self._pending.done():
            wait = self._delay
            if self._pause_threshold > 0 and self._last_duration:
                since = time.monotonic() - self._last_end
                wait = max(wait, self._last_duration / self._pause_threshold - since)
            self._pending = asyncio.get_running_loop().create_task(self._later(wait), name="gc")

    async def _later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        try:
            await self.collect_now()
        except Exception:
            log.exception("garbage collection failed")

    async def collect_now(self) -> gcmeta.Collected:
        async with self._lock:
            started = time.perf_counter()
            collected = await self._collect()
            self.runs += 1
            self._last_duration = time.perf_counter() - started
            self._last_end = time.monotonic()
            if not collected.empty:
                log.info(
                    "garbage collected %d blob(s), %d snapshot(s), %d ingest(s), %d lease(s)"
                    " in %.1f ms",
                    len(collected.content),
                    len(collected.snapshots),
                    len(collected.ingests),
                    len(collected.leases),
                    (time.perf_counter() - started) * 1e3,
                )
            return collected

    async def _collect(self) -> gcmeta.Collected:
        backend = self._content.backend
        async with self._content.exclusive():
            collected = await self._db.update(lambda c: gcmeta.collect(c, time.time_ns()))
            if collected.content:
                self._content.forget_infos()
            referenced = await self._db.view(gcmeta.referenced_digests)

            def _sweep() -> None:
                for info in list(backend.walk()):
                    if info.digest not in referenced:
                        with contextlib.suppress(NotFound, OSError):
                            backend.delete(info.digest)
                for ns, ref in collected.ingests:
                    with contextlib.suppress(NotFound, OSError):
                        backend.abort(f"{ns}/{ref}")

            await asyncio.to_thread(_sweep)
        if self._snapshots is not None:
            for name in self._snapshots.names:
                await self._snapshots.get(name).prune()
        return collected

    async def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pending
