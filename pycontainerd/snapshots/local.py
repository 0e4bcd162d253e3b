"""The shared machinery of the on-disk snapshotters (overlayfs, native).

Layout of a snapshotter root (mode 0700)::

    metadata.db            the FileStore (sqlite, WAL) of a standalone snapshotter; in the
                           daemon the table lives in the metadata database (SharedStore)
    snapshots/<id>/fs      the snapshot's files (0755)
    snapshots/<id>/work    overlay's work dir, active snapshots only (0711)
    snapshots/new-*        a snapshot being created (crash leftovers are reclaimed by cleanup)

Creation follows containerd's crash-consistent order: build everything in a ``new-*``
temporary directory, run the metastore transaction, rename the directory to its id
inside that transaction, and remove it again if the commit fails (with a SharedStore,
when the enclosing metadata transaction rolls back). Removal commits the transaction
first and deletes the directory afterwards, off the caller's path on a background thread;
a crash in between leaves a directory no id names, which ``cleanup`` reclaims (``cleanup``
first waits for queued removals). A crash after the rename but before the commit leaves
a directory under an id the next snapshot is given again: creation removes such a stale
directory first.

Each public (async) operation is exactly one ``asyncio.to_thread`` hop into the
synchronous ``<name>_sync`` method, which the namespaced layer may also call directly from
its own worker thread (``SyncSnapshotter``) to run backend work and its metadata
transaction in a single hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from pycontainerd import labels as labelutil
from pycontainerd.errdefs import AlreadyExists, FailedPrecondition, NotFound
from pycontainerd.snapshots import storage
from pycontainerd.snapshots.snapshotter import Info, Kind, Usage, filter_infos

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pycontainerd.metadata.db import MetadataDB
    from pycontainerd.snapshots.mount import Mount

__all__ = ["SMALL_SNAPSHOT", "LocalSnapshotter", "disk_usage", "small_disk_usage"]

log = logging.getLogger(__name__)

# Entries a snapshot may hold for commit_small_sync to measure it inside its transaction.
SMALL_SNAPSHOT = 256


def disk_usage(root: Path) -> Usage:
    """Allocated bytes and distinct inodes under ``root`` (hard links counted once)."""
    usage = _walk_usage(root, None)
    assert usage is not None
    return usage


def small_disk_usage(root: Path, limit: int) -> Usage | None:
    """``disk_usage`` of a tree of at most ``limit`` entries; None for a bigger one."""
    return _walk_usage(root, limit)


def _walk_usage(root: Path, limit: int | None) -> Usage | None:
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [os.fspath(root)]
    try:
        st = os.lstat(stack[0])
    except FileNotFoundError:
        return Usage()
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        if limit is not None:
            limit -= len(entries)
            if limit < 0:
                return None
        for entry in entries:
            try:
                est = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            ino = (est.st_dev, est.st_ino)
            if ino not in seen:
                seen.add(ino)
                size += est.st_blocks * 512
            if stat.S_ISDIR(est.st_mode):
                stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))


def _committable(tx: storage.Txn, name: str, key: str) -> str:
    """The id of active snapshot ``key``, to be committed as ``name`` (AlreadyExists,
    NotFound or FailedPrecondition otherwise)."""
    if tx.lookup(name) is not None:
        raise AlreadyExists(f"committed snapshot {name!r}")
    sid, info, _ = tx.get_info(key)
    if info.kind != Kind.ACTIVE:
        raise FailedPrecondition(f"snapshot {key!r} is not active")
    return sid


def _remove_dir(path: Path) -> None:
    # Most removed snapshots are empty (views, unused container layers): three rmdirs
    # instead of rmtree's descriptor walk.
    try:
        for sub in ("fs", "work"):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path / sub)
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass  # not empty
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("snapshot dir %s not removed: %s", path, exc)


class LocalSnapshotter:
    """Base of the directory-per-snapshot snapshotters; subclasses say how to fill and
    mount a snapshot."""

    # Whether a new snapshot starts as a copy of its parent's tree (native) rather than
    # an empty upper directory stacked on the parents (overlay).
    copies_parent = False
    cheap_create = True

    def __init__(
        self,
        root: Path,
        *,
        synchronous: str = "FULL",
        db: MetadataDB | None = None,
        table: str = "",
    ) -> None:
        """A snapshotter at ``root``. With ``db`` (call from a worker thread, not the
        loop) its snapshot table is ``table`` in that metadata database, else a file of
        its own in ``root``."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(exist_ok=True, mode=0o700)
        self._ms: storage.MetaStore
        if db is not None:
            self._ms = storage.SharedStore.open(db, table, self.root, self.snapshots_dir)
        else:
            self._ms = storage.FileStore(self.root / "metadata.db", synchronous=synchronous)
        # Temp dirs under construction outside the metastore lock; cleanup skips them.
        self._pending: set[str] = set()
        self._pid = os.getpid()
        self._names = itertools.count()
        self._pending_lock = threading.Lock()
        self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-reaper")

    @property
    def shares_transactions(self) -> bool:
        """Whether writes made on the metadata database thread join its transaction."""
        return self._ms.shares_transactions

    # --- paths and hooks ----------------------------------------------------------------

    def fs_path(self, sid: str) -> Path:
        return self.snapshots_dir / sid / "fs"

    def work_path(self, sid: str) -> Path:
        return self.snapshots_dir / sid / "work"

    def _populate(self, td: Path, kind: Kind, parent_fs: Path | None) -> None:
        """Fill the temporary snapshot directory ``td`` (runs outside the metastore lock)."""
        raise NotImplementedError

    def _new_dir(self) -> Path:
        """A fresh ``new-*`` directory (mode 0700). Named from a counter, not
        ``tempfile.mkdtemp``'s random letters: that cost a tenth of a millisecond of the
        ~4 ms Prepare + Commit + Remove cycle. The pid keeps names apart from a previous
        run's leftovers; a name taken anyway is skipped."""
        while True:
            td = self.snapshots_dir / f"new-{self._pid}-{next(self._names)}"
            try:
                os.mkdir(td, 0o700)
            except FileExistsError:
                continue
            return td

    def _adopt(self, td: Path, snap: storage.Snapshot) -> None:
        """Last touches inside the creating transaction, before the rename."""

    def _mounts(self, snap: storage.Snapshot) -> list[Mount]:
        raise NotImplementedError

    # --- async facade -------------------------------------------------------------------

    async def stat(self, key: str) -> Info:
        return await asyncio.to_thread(self.stat_sync, key)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        return await asyncio.to_thread(self.update_sync, info, tuple(fieldpaths))

    async def usage(self, key: str) -> Usage:
        return await asyncio.to_thread(self.usage_sync, key)

    async def mounts(self, key: str) -> list[Mount]:
        return await asyncio.to_thread(self.mounts_sync, key)

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return await asyncio.to_thread(self.create_sync, Kind.ACTIVE, key, parent, labels or {})

    async def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return await asyncio.to_thread(self.create_sync, Kind.VIEW, key, parent, labels or {})

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        await asyncio.to_thread(self.commit_sync, name, key, labels or {})

    async def remove(self, key: str) -> None:
        await asyncio.to_thread(self.remove_sync, key)

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        return await asyncio.to_thread(self.walk_sync, tuple(filter_strings))

    async def cleanup(self) -> None:
        await asyncio.to_thread(self.cleanup_sync)

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    # --- synchronous operations ---------------------------------------------------------

    def stat_sync(self, key: str) -> Info:
        return self._ms.read(lambda tx: tx.get_info(key)[1])

    def update_sync(self, info: Info, fieldpaths: tuple[str, ...]) -> Info:
        return self._ms.write(lambda tx: tx.update_info(info, fieldpaths))

    def usage_sync(self, key: str) -> Usage:
        sid, info, recorded = self._ms.read(lambda tx: tx.get_info(key))
        if info.kind == Kind.ACTIVE:
            # Measured outside the lock: walking a big layer must not stall the others.
            return disk_usage(self.fs_path(sid))
        return recorded

    def mounts_sync(self, key: str) -> list[Mount]:
        return self._mounts(self._ms.read(lambda tx: tx.get_snapshot(key)))

    def create_sync(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        labels = labelutil.validate(labels)
        parent_fs: Path | None = None
        if self.copies_parent and parent:
            # Resolve (and fail fast) before the possibly long copy of the parent's tree.

            def resolve(tx: storage.Txn) -> Path:
                if tx.lookup(key) is not None:
                    raise AlreadyExists(f"snapshot {key!r}")
                return self.fs_path(tx.parent_id(parent))

            parent_fs = self._ms.read(resolve)
        with self._pending_lock:
            td = self._new_dir()
            self._pending.add(td.name)
        final: Path | None = None

        def insert(tx: storage.Txn) -> storage.Snapshot:
            nonlocal final
            snap = tx.create_snapshot(kind, key, parent, labels)
            self._adopt(td, snap)
            final = self.snapshots_dir / snap.id
            self._place(td, final)
            return snap

        try:
            self._populate(td, kind, parent_fs)
            snap = self._ms.write(insert)
        except BaseException:
            shutil.rmtree(td, ignore_errors=True)
            if final is not None:  # renamed, but the transaction did not commit
                shutil.rmtree(final, ignore_errors=True)
            raise
        finally:
            with self._pending_lock:
                self._pending.discard(td.name)
        placed = final
        assert placed is not None
        self._ms.on_rollback(lambda: _remove_dir(placed))
        return self._mounts(snap)

    def _place(self, td: Path, final: Path) -> None:
        """Rename ``td`` to the new snapshot's ``final`` directory. One already there is a
        crash's leftover under an id never committed (ids are handed out once): it goes."""
        try:
            os.rename(td, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            log.warning("snapshot dir %s left by a crash: removed", final)
            shutil.rmtree(final)
            os.rename(td, final)

    def commit_sync(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        labels = labelutil.validate(labels)
        for _ in range(3):
            sid = self._ms.read(lambda tx: _committable(tx, name, key))
            usage = disk_usage(self.fs_path(sid))  # outside the lock, like _usage

            def record(tx: storage.Txn, sid: str = sid, usage: Usage = usage) -> bool:
                found = tx.lookup(key)
                if found is not None and str(found[0]) != sid:
                    return False  # key was removed and prepared again: measure again
                tx.commit_active(key, name, usage, labels)
                return True

            if self._ms.write(record):
                return
        raise FailedPrecondition(f"snapshot {key!r} keeps changing during commit")

    def commit_small_sync(self, name: str, key: str, labels: Mapping[str, str]) -> bool:
        """``commit`` in one metastore transaction when the active snapshot holds at
        most ``SMALL_SNAPSHOT`` entries (measured inside it: quick); False, with nothing
        done, for a bigger one (use ``commit_sync``, which measures outside the lock)."""
        labels = labelutil.validate(labels)

        def commit(tx: storage.Txn) -> bool:
            usage = small_disk_usage(self.fs_path(_committable(tx, name, key)), SMALL_SNAPSHOT)
            if usage is None:
                return False
            tx.commit_active(key, name, usage, labels)
            return True

        return self._ms.write(commit)

    def remove_sync(self, key: str) -> None:
        sid, _ = self._ms.write(lambda tx: tx.remove(key))
        # The snapshot is gone once the transaction commits; its directory is deleted then,
        # in the background (containerd's overlay removes asynchronously too). A failure
        # or crash only leaves an orphan that cleanup reclaims.
        self._ms.after_commit(lambda: self._reaper.submit(_remove_dir, self.snapshots_dir / sid))

    def remove_many_sync(self, keys: Sequence[str]) -> list[tuple[str, Exception]]:
        failed: list[tuple[str, Exception]] = []

        def remove(tx: storage.Txn) -> list[str]:
            sids: list[str] = []
            for key in keys:
                try:
                    sids.append(tx.remove(key)[0])
                except (NotFound, FailedPrecondition) as exc:  # checked before any change
                    failed.append((key, exc))
            return sids

        sids = self._ms.write(remove)

        def reap() -> None:
            for sid in sids:
                self._reaper.submit(_remove_dir, self.snapshots_dir / sid)

        self._ms.after_commit(reap)
        return failed

    def flush_removals(self) -> None:
        """Wait until every directory removal queued so far has finished."""
        self._reaper.submit(lambda: None).result()

    def walk_sync(self, filter_strings: tuple[str, ...]) -> list[Info]:
        return filter_infos(self._ms.read(lambda tx: tx.walk()), filter_strings)

    def cleanup_sync(self) -> None:
        self.flush_removals()

        # The write transaction keeps new snapshots from appearing between listing and
        # checking.
        def orphans(tx: storage.Txn) -> list[Path]:
            with self._pending_lock:
                known = tx.ids()
                return [
                    self.snapshots_dir / d
                    for d in os.listdir(self.snapshots_dir)
                    if d not in known and d not in self._pending
                ]

        for path in self._ms.write(orphans):
            _remove_dir(path)

    def close_sync(self) -> None:
        self._reaper.shutdown(wait=True)
        self._ms.close()
