"""The leases domain service: lease records, their resources, and expiry.

A lease whose ``containerd.io/gc.expire`` time has passed protects nothing; the service
deletes it when it expires (a timer set to the soonest expiry) and, once garbage
collection exists, asks for a collection. ``Delete(sync=True)`` waits for that collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pycontainerd import labels as labelsmod
from pycontainerd.metadata import leases as store
from pycontainerd.metadata.leases import Lease, Resource
from pycontainerd.namespaces import namespace_required

if TYPE_CHECKING:
    import sqlite3

    from pycontainerd.metadata.db import MetadataDB

__all__ = ["Lease", "LeaseService", "Resource"]

log = logging.getLogger(__name__)

GCHook = Callable[[bool], Awaitable[None]]


def new_lease_id() -> str:
    # Same shape as the ids containerd's client generates: <nanos>-<random>.
    return f"{time.time_ns() % 1_000_000_000}-{secrets.token_urlsafe(3)}"


class LeaseService:
    def __init__(self, db: MetadataDB) -> None:
        self._db = db
        self._gc: GCHook | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def set_gc(self, hook: GCHook) -> None:
        """Install the garbage collector's trigger: ``await hook(sync)``."""
        self._gc = hook

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._expiry_loop(), name="lease-expiry"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def create(self, lease_id: str, labels: dict[str, str]) -> Lease:
        ns = namespace_required()
        lease = Lease(lease_id or new_lease_id(), 0, labelsmod.validate(labels))
        created = await self._db.update(lambda c: store.create(c, ns, lease))
        if store.EXPIRE_LABEL in created.labels:
            self._wake.set()
        return created

    async def delete(self, lease_id: str, sync: bool = False) -> None:
        ns = namespace_required()
        await self._db.update(lambda c: store.delete(c, ns, lease_id))
        await self._collect(sync)

    async def list_leases(self) -> list[Lease]:
        ns = namespace_required()
        return await self._db.view(lambda c: store.list_all(c, ns))

    async def add_resource(self, lease_id: str, resource: Resource) -> None:
        ns = namespace_required()
        await self._db.update(lambda c: store.add_resource(c, ns, lease_id, resource))

    async def delete_resource(self, lease_id: str, resource: Resource) -> None:
        ns = namespace_required()
        await self._db.update(lambda c: store.delete_resource(c, ns, lease_id, resource))
        await self._collect(False)

    async def list_resources(self, lease_id: str) -> list[Resource]:
        ns = namespace_required()
        return await self._db.view(lambda c: store.list_resources(c, ns, lease_id))

    async def _collect(self, sync: bool) -> None:
        if self._gc is not None:
            await self._gc(sync)

    async def expire_now(self) -> int:
        """Delete every expired lease; returns how many went."""
        now = time.time_ns()

        def _expire(c: sqlite3.Connection) -> int:
            gone = store.expired(c, now)
            for ns, lid in gone:
                store.delete(c, ns, lid)
            return len(gone)

        n = await self._db.update(_expire)
        if n:
            log.info("removed %d expired lease(s)", n)
            await self._collect(False)
        return n

    async def _expiry_loop(self) -> None:
        while True:
            try:
                await self.expire_now()
                soonest = await self._db.view(store.next_expiry)
            except Exception:
                log.exception("lease expiry sweep failed")
                soonest = None
            delay = 3600.0 if soonest is None else max(0.0, (soonest - time.time_ns()) / 1e9) + 0.01
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, 3600.0))
