"""The namespaced snapshot layer: per-namespace keys over shared backend snapshotters.

Clients name snapshots per namespace; the backends know one flat key space. Each
namespaced snapshot is a row of the metadata table ``snapshots`` (namespace, snapshotter,
key) holding its backend key ``"<namespace>/<seq>/<key>"``, its namespaced parent, kind,
labels and timestamps. Only labels prefixed ``containerd.io/snapshot/`` reach the backend.

Order of work, as containerd's ``metadata/snapshot.go`` with sqlite instead of bolt:

- create: check, act on the backend and record, all in one write transaction on the
  database thread when the backend's create is cheap (overlayfs: a few directories); for
  a backend that copies its parent (native), check in a read transaction, create on a
  worker thread, then record. If recording fails, the created backend snapshot is
  removed again;
- commit: a small snapshot (at most ``SMALL_SNAPSHOT`` entries) like a create, in one
  transaction on the database thread; a bigger one on a worker thread: check (a read on
  that thread's own connection), commit in the backend (which walks the snapshot for its
  disk usage, too slow for the database thread), then record;
- remove: with a backend whose table shares the metadata database (overlayfs and native
  in the daemon), delete both rows in one transaction, the directory after it commits.
  Otherwise delete the row (and its lease references) first; the backend snapshot is then
  removed in the background, in order, off the caller's path, after a short linger that
  lets a burst of removals share one backend transaction (containerd leaves it to
  garbage collection entirely). A crash in between leaves a backend orphan for GC.

Mutations of one snapshotter are serialised by an asyncio lock, which is what makes
"two unpacks commit the same chain ID concurrently" end with one winner and one
``AlreadyExists`` while the loser's active snapshot stays intact. Reads take no lock.

When the request names a lease (``containerd-lease``), created and committed snapshots
are recorded in ``lease_resources`` with type ``snapshots/<snapshotter>``; an unknown
lease is ``NotFound``. Events ``/snapshot/prepare``, ``/snapshot/commit`` and
``/snapshot/remove`` are published after the transaction commits (views publish none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from pycontainerd import labels as labelutil
from pycontainerd import namespaces
from pycontainerd.api.events import snapshot_pb2
from pycontainerd.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PycdError,
)
from pycontainerd.snapshots import records
from pycontainerd.snapshots.snapshotter import (
    Info,
    Kind,
    Snapshotter,
    SyncSnapshotter,
    Usage,
    filter_infos,
    inherited_labels,
)

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Awaitable, Mapping, Sequence

    from google.protobuf.message import Message

    from pycontainerd.events import Publisher
    from pycontainerd.metadata.db import MetadataDB
    from pycontainerd.snapshots.mount import Mount

__all__ = ["NamespacedSnapshotter", "SnapshotService"]

log = logging.getLogger(__name__)

T = TypeVar("T")

TOPIC_PREPARE = "/snapshot/prepare"
TOPIC_COMMIT = "/snapshot/commit"
TOPIC_REMOVE = "/snapshot/remove"

# A label naming the committed snapshot a prepare is expected to produce (remote
# snapshotters); if it already exists in the namespace the prepare is AlreadyExists.
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"

# Seconds a backend removal waits for others to share its transaction.
REMOVAL_LINGER = 0.05


async def _finish(work: Awaitable[T]) -> T:
    """Await ``work`` (a thread running a backend step and its transaction) to its end.

    On cancellation the thread keeps going: wait for it before letting the caller release
    the snapshotter lock, so the next mutation never overlaps a half-done one.
    """
    fut = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise


class _Sequence:
    """Strictly increasing numbers for backend keys, unique across restarts (clock based)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns())
        return self._last


class NamespacedSnapshotter:
    """One backend snapshotter seen through the request's namespace (``Snapshotter``)."""

    def __init__(
        self,
        name: str,
        backend: Snapshotter,
        db: MetadataDB,
        publisher: Publisher | None,
        seq: _Sequence,
    ) -> None:
        self.name = name
        self.backend = backend
        self._db = db
        self._publisher = publisher
        self._seq = seq
        self._lock = asyncio.Lock()
        # Backends with a synchronous API get their work and our transaction in one hop.
        self._sync = backend if isinstance(backend, SyncSnapshotter) else None
        self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reap-{name}")
        self._tasks: set[asyncio.Task[None]] = set()
        self._doomed: list[str] = []
        self._linger: asyncio.TimerHandle | None = None
        self._lease_type = f"snapshots/{name}"

    def _backend_key(self, ns: str, key: str) -> str:
        return f"{ns}/{self._seq.next()}/{key}"

    def _publish(self, topic: str, msg: Message, ns: str) -> None:
        if self._publisher is not None:
            self._publisher.publish(topic, msg, namespace=ns)

    # --- reads ----------------------------------------------------------------------------

    async def stat(self, key: str) -> Info:
        ns = namespaces.namespace_required()
        sn = self.name
        return (await self._db.view(lambda c: records.must(c, ns, sn, key))).info()

    async def usage(self, key: str) -> Usage:
        ns = namespaces.namespace_required()
        sn = self.name
        row = await self._db.view(lambda c: records.must(c, ns, sn, key))
        return await self.backend.usage(row.backend_key)

    async def mounts(self, key: str) -> list[Mount]:
        ns = namespaces.namespace_required()
        sn = self.name
        sync = self._sync

        def active(c: sqlite3.Connection) -> records.Row:
            row = records.must(c, ns, sn, key)
            if row.kind == Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key!r} is committed, it has no mounts")
            return row

        if sync is not None and sync.shares_transactions:
            # Both rows on the database thread: one hop.
            return await self._db.view(lambda c: sync.mounts_sync(active(c).backend_key))
        row = await self._db.view(active)
        return await self.backend.mounts(row.backend_key)

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        ns = namespaces.namespace_required()
        sn = self.name
        infos = await self._db.view(lambda c: records.infos(c, ns, sn))
        return filter_infos(infos, filter_strings)

    # --- mutations ------------------------------------------------------------------------

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        ns = namespaces.namespace_required()
        mounts = await self._create(Kind.ACTIVE, key, parent, labels)
        self._publish(TOPIC_PREPARE, snapshot_pb2.SnapshotPrepare(key=key, parent=parent), ns)
        return mounts

    async def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return await self._create(Kind.VIEW, key, parent, labels)

    async def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        ns = namespaces.namespace_required()
        lease = namespaces.lease()
        sn = self.name
        base = labelutil.validate(labels or {})
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        target = base.get(LABEL_SNAPSHOT_REF, "")

        def check(conn: sqlite3.Connection) -> str:
            if lease:
                records.require_lease(conn, ns, lease)
            if target and records.get(conn, ns, sn, target) is not None:
                raise AlreadyExists(f"target snapshot {target!r}")
            if records.get(conn, ns, sn, key) is not None:
                raise AlreadyExists(f"snapshot {key!r}")
            if not parent:
                return ""
            prow = records.get(conn, ns, sn, parent)
            if prow is None:
                raise NotFound(f"parent snapshot {parent!r} does not exist")
            if prow.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            return prow.backend_key

        def record(conn: sqlite3.Connection, bkey: str, bparent: str) -> None:
            if parent:
                prow = records.get(conn, ns, sn, parent)
                if prow is None or prow.backend_key != bparent:
                    raise NotFound(f"parent snapshot {parent!r} does not exist")
            records.insert(conn, ns, sn, key, bkey, parent, kind, base)
            if lease:
                records.require_lease(conn, ns, lease)
                records.add_to_lease(conn, ns, lease, self._lease_type, key)

        blabels = inherited_labels(base)
        async with self._lock:
            bkey = self._backend_key(ns, key)
            sync = self._sync
            if sync is not None and sync.cheap_create:
                # Checks, backend work and record in one transaction on the database
                # thread: one hop instead of three (containerd's order, too: the backend
                # acts inside the metadata transaction).
                created = False

                def in_txn(conn: sqlite3.Connection) -> list[Mount]:
                    nonlocal created
                    bparent = check(conn)
                    mounts = sync.create_sync(kind, bkey, bparent, blabels)
                    created = True
                    record(conn, bkey, bparent)
                    return mounts

                try:
                    return await _finish(self._db.update(in_txn))
                except BaseException:
                    # A backend sharing the transaction was rolled back with it.
                    if created and not sync.shares_transactions:
                        await asyncio.to_thread(self._discard_sync, sync, bkey)
                    raise
            bparent = await self._db.view(check)
            if sync is not None:

                def work() -> list[Mount]:
                    mounts = sync.create_sync(kind, bkey, bparent, blabels)
                    try:
                        self._db.update_sync(lambda conn: record(conn, bkey, bparent))
                    except BaseException:
                        self._discard_sync(sync, bkey)
                        raise
                    return mounts

                return await _finish(asyncio.to_thread(work))
            create = self.backend.view if kind == Kind.VIEW else self.backend.prepare
            mounts = await create(bkey, bparent, blabels)
            try:
                await self._db.update(lambda conn: record(conn, bkey, bparent))
            except BaseException:
                await self._discard(bkey)
                raise
        return mounts

    def _discard_sync(self, sync: SyncSnapshotter, bkey: str) -> None:
        try:
            sync.remove_sync(bkey)
        except (PycdError, OSError) as exc:
            log.error(
                "snapshotter %s: unreferenced snapshot %r not removed: %s", self.name, bkey, exc
            )

    async def _discard(self, bkey: str) -> None:
        try:
            await self.backend.remove(bkey)
        except (PycdError, OSError) as exc:
            log.error(
                "snapshotter %s: unreferenced snapshot %r not removed: %s", self.name, bkey, exc
            )

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        ns = namespaces.namespace_required()
        lease = namespaces.lease()
        sn = self.name
        base = labelutil.validate(labels or {})
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")

        def check(conn: sqlite3.Connection) -> records.Row:
            if lease:
                records.require_lease(conn, ns, lease)
            if records.get(conn, ns, sn, name) is not None:
                raise AlreadyExists(f"snapshot {name!r}")
            row = records.must(conn, ns, sn, key)
            if row.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            return row

        blabels = inherited_labels(base)

        def record(conn: sqlite3.Connection, row: records.Row, bname: str) -> None:
            records.insert(conn, ns, sn, name, bname, row.parent, Kind.COMMITTED, base)
            records.delete(conn, ns, sn, key, self._lease_type)
            # A lease that vanished meanwhile only loses its reference, not the commit.
            if lease and records.lease_exists(conn, ns, lease):
                records.add_to_lease(conn, ns, lease, self._lease_type, name)

        def lost(bname: str) -> None:
            # The backend already committed; nothing can bring the active one back.
            log.error(
                "snapshotter %s: commit of %r recorded nowhere; backend %r is orphaned",
                sn,
                key,
                bname,
            )

        async with self._lock:
            bname = self._backend_key(ns, name)
            sync = self._sync
            done = False
            if sync is not None:
                # A small snapshot is measured and committed, and the commit recorded,
                # in one transaction on the database thread, as a prepare is.
                committed = False

                def in_txn(conn: sqlite3.Connection) -> bool:
                    nonlocal committed
                    row = check(conn)
                    if not sync.commit_small_sync(bname, row.backend_key, blabels):
                        return False
                    committed = True
                    record(conn, row, bname)
                    return True

                try:
                    done = await _finish(self._db.update(in_txn))
                except BaseException:
                    if committed and not sync.shares_transactions:
                        lost(bname)
                    raise
            if not done and sync is not None:
                # A big snapshot: one hop to a worker thread, which reads for the check,
                # has the backend measure the snapshot's disk usage (too slow a walk for
                # the database thread) and commit, then visits the database thread to
                # record.

                def work() -> None:
                    row = self._db.read_sync(check)
                    sync.commit_sync(bname, row.backend_key, blabels)
                    try:
                        self._db.update_sync(lambda conn: record(conn, row, bname))
                    except BaseException:
                        lost(bname)
                        raise

                await _finish(asyncio.to_thread(work))
            elif not done:
                row = await self._db.view(check)
                await self.backend.commit(bname, row.backend_key, blabels)
                try:
                    await self._db.update(lambda conn: record(conn, row, bname))
                except BaseException:
                    lost(bname)
                    raise
        self._publish(TOPIC_COMMIT, snapshot_pb2.SnapshotCommit(key=key, name=name), ns)

    async def remove(self, key: str) -> None:
        ns = namespaces.namespace_required()
        sn = self.name

        def record(conn: sqlite3.Connection) -> str:
            row = records.must(conn, ns, sn, key)
            if records.has_children(conn, ns, sn, key):
                raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")
            records.delete(conn, ns, sn, key, self._lease_type)
            return row.backend_key

        sync = self._sync
        async with self._lock:
            if sync is not None and sync.shares_transactions:
                # Both rows go in one transaction (the directory after it commits).

                # A backend failure is undone alone (a savepoint); GC's prune retries.
                await self._db.update(lambda conn: self._discard_sync(sync, record(conn)))
            else:
                self._queue_removal(await self._db.update(record))
        self._publish(TOPIC_REMOVE, snapshot_pb2.SnapshotRemove(key=key), ns)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        ns = namespaces.namespace_required()
        sn = self.name
        if not info.name:
            raise InvalidArgument("snapshot name must not be empty")
        paths = tuple(fieldpaths)

        def record(conn: sqlite3.Connection) -> tuple[Info, str, bool]:
            row = records.must(conn, ns, sn, info.name)
            if paths:
                new = labelutil.apply_paths(
                    row.labels, info.labels, paths, f"snapshot {info.name!r}"
                )
                new_labels = row.labels if new is None else new
            else:
                new_labels = labelutil.validate(info.labels)
            now = records.set_labels(conn, ns, sn, info.name, new_labels)
            changed = inherited_labels(new_labels) != inherited_labels(row.labels)
            updated = Info(row.key, row.kind, row.parent, new_labels, row.created_at, now)
            return updated, row.backend_key, changed

        updated, bkey, changed = await self._db.update(record)
        if changed:
            await self.backend.update(
                Info(name=bkey, kind=updated.kind, labels=inherited_labels(updated.labels))
            )
        return updated

    async def cleanup(self) -> None:
        await self.backend.cleanup()

    async def prune(self) -> list[str]:
        """Remove backend snapshots no namespace references, then reclaim disk space.

        The garbage collector calls this after deleting metadata rows (containerd's
        snapshotter ``garbageCollect``). It holds the mutation lock, so a snapshot being
        created (in the backend, not yet recorded) is never mistaken for an orphan.
        Returns the backend keys removed. Children go before their parents; an orphan
        that still has a referenced child is kept.
        """
        sn = self.name

        removed: list[str] = []
        async with self._lock:
            await self.flush_removals()
            keep = await self._db.view(lambda c: records.backend_keys(c, sn))
            infos = await self.backend.walk()
            children: dict[str, int] = {}
            for i in infos:
                if i.parent:
                    children[i.parent] = children.get(i.parent, 0) + 1
            parent_of = {i.name: i.parent for i in infos}
            ready = [i.name for i in infos if i.name not in keep and not children.get(i.name)]
            while ready:
                key = ready.pop()
                try:
                    await self.backend.remove(key)
                except (PycdError, OSError) as exc:
                    log.warning("snapshotter %s: orphan %r not removed: %s", sn, key, exc)
                    continue
                removed.append(key)
                parent = parent_of.get(key, "")
                if parent:
                    children[parent] -= 1
                    if not children[parent] and parent not in keep:
                        ready.append(parent)
        await self.backend.cleanup()
        return removed

    def _discard_many_sync(self, sync: SyncSnapshotter, bkeys: list[str]) -> None:
        for bkey, exc in sync.remove_many_sync(bkeys):
            log.error(
                "snapshotter %s: unreferenced snapshot %r not removed: %s", self.name, bkey, exc
            )

    def _queue_removal(self, bkey: str) -> None:
        # The namespaced snapshot is gone once its row is; the backend snapshot goes in
        # the background (in order, so children before parents), off the caller's path.
        # Removals linger briefly and go in batches, one backend transaction each, as
        # containerd's delayed garbage collection does: a burst of removals costs one
        # fsync, not one each, and does not compete with the requests that follow it.
        sync = self._sync
        if sync is not None:
            self._doomed.append(bkey)
            if self._linger is None:
                loop = asyncio.get_running_loop()
                self._linger = loop.call_later(REMOVAL_LINGER, self._submit_removals)
            return
        task = asyncio.get_running_loop().create_task(self._discard(bkey))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _submit_removals(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        doomed, self._doomed = self._doomed, []
        if doomed and self._sync is not None:
            self._reaper.submit(self._discard_many_sync, self._sync, doomed)

    async def flush_removals(self) -> None:
        """Wait until the backend removals queued so far are done."""
        self._submit_removals()
        if self._tasks:
            await asyncio.gather(*self._tasks)
        await asyncio.to_thread(lambda: self._reaper.submit(lambda: None).result())

    async def close(self) -> None:
        """Finish queued backend removals; the backend itself is closed by its plugin."""
        await self.flush_removals()
        await asyncio.to_thread(self._reaper.shutdown, True)


class SnapshotService:
    """All loaded snapshotters, namespaced; what the Snapshots API and other services use."""

    def __init__(
        self,
        db: MetadataDB,
        snapshotters: Mapping[str, Snapshotter],
        publisher: Publisher | None = None,
    ) -> None:
        seq = _Sequence()
        self._snapshotters = {
            name: NamespacedSnapshotter(name, sn, db, publisher, seq)
            for name, sn in snapshotters.items()
        }

    @property
    def names(self) -> list[str]:
        return sorted(self._snapshotters)

    async def close(self) -> None:
        """Wait for queued backend removals (before the snapshotter plugins close)."""
        for sn in self._snapshotters.values():
            await sn.close()

    def get(self, name: str) -> NamespacedSnapshotter:
        """The namespaced snapshotter ``name``; InvalidArgument when missing or not loaded."""
        if not name:
            raise InvalidArgument("snapshotter argument missing")
        sn = self._snapshotters.get(name)
        if sn is None:
            raise InvalidArgument(f"snapshotter not loaded: {name}")
        return sn
