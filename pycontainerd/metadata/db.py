"""The metadata database: sqlite in WAL mode, owned by one dedicated thread.

Every read and write of namespaced metadata goes through ``MetadataDB.view`` or
``MetadataDB.update``. Each takes a *synchronous* closure that receives the connection;
the closure runs on the database thread, so the event loop never blocks on sqlite, and
``update`` wraps it in one ``BEGIN IMMEDIATE`` transaction (commit on return, rollback on
exception). Closures must not await or call back into the loop.

Code already on the database thread, inside an ``update`` (a backend snapshotter whose
table shares this database, called from a namespaced snapshot transaction), reads with
``read_sync`` and writes with ``write_sync`` on the same connection: its writes become a
savepoint of the transaction in progress, and ``on_rollback``/``after_commit`` let it
act on how that transaction ends (undo a directory it made, delete one only once its row
is gone for good).

The schema and its migrations live in ``pycontainerd.metadata.schema``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import TYPE_CHECKING, TypeVar

from pycontainerd.errdefs import FailedPrecondition
from pycontainerd.worker import Worker

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Hooks:
    """What to run when the update in progress ends."""

    __slots__ = ("committed", "rolled_back")

    def __init__(self) -> None:
        self.committed: list[Callable[[], object]] = []
        self.rolled_back: list[Callable[[], object]] = []


class MetadataDB:
    """A sqlite database served by a single worker thread."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._worker = Worker("metadata-db")
        self._conn: sqlite3.Connection | None = None
        # read_sync's connections, one per worker thread that reads (WAL: readers never
        # block the writer or each other).
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        # While an update runs: what to do after it commits / when it rolls back.
        self._hooks: _Hooks | None = None

    async def open(self) -> None:
        from pycontainerd.metadata import schema

        def _open() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            self._conn = conn
            schema.migrate(conn)

        await self._run(_open)

    async def close(self) -> None:
        def _close() -> None:
            with self._readers_lock:
                self._closed = True
                for reader in self._readers:
                    reader.close()
                self._readers.clear()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._run(_close)
        finally:
            self._worker.close()

    async def view(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only closure on the database thread."""

        return await self._run(lambda: self._view_inline(fn))

    def read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read-only closure on the calling worker thread (never the loop), over a
        connection of that thread's own: no hop to the database thread. It sees every
        transaction committed before it starts. On the database thread itself it reads
        on the main connection, inside the transaction in progress if there is one."""
        if self._worker.in_thread():
            return self._read_here(fn)
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._readers_lock:
                if self._closed:
                    raise FailedPrecondition("metadata database is closed")
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30
                )
                conn.execute("PRAGMA query_only=ON")
                self._readers.append(conn)
            self._local.conn = conn
        elif self._closed:
            raise FailedPrecondition("metadata database is closed")
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    def view_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``view`` for code on a worker thread, or inline on the database thread (inside
        the transaction in progress there, if any). Unlike ``read_sync`` it opens no
        connection for the calling thread."""
        if self._worker.in_thread():
            return self._read_here(fn)
        return self._worker.call(lambda: self._view_inline(fn))

    def _read_here(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        return fn(conn) if conn.in_transaction else self._view_inline(fn)

    def _view_inline(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    async def update(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a closure inside one write transaction on the database thread."""

        return await self._run(lambda: self._update_inline(fn))

    def update_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``update`` for code already running on a worker thread (never on the loop)."""
        return self._worker.call(lambda: self._update_inline(fn))

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A write from a worker thread: ``update_sync``, or on the database thread inside
        an ``update``, a savepoint of it (``fn``'s changes are undone alone if it raises,
        and kept or undone with the whole transaction otherwise)."""
        if not self._worker.in_thread():
            return self.update_sync(fn)
        if self._hooks is None:
            raise RuntimeError("write_sync on the database thread outside an update")
        conn = self._connection()
        conn.execute("SAVEPOINT nested")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK TO nested")
            conn.execute("RELEASE nested")
            raise
        conn.execute("RELEASE nested")
        return result

    def in_update(self) -> bool:
        """Whether the caller runs inside an ``update`` on the database thread."""
        return self._hooks is not None and self._worker.in_thread()

    def after_commit(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the database thread once the ``update`` in progress commits."""
        self._current_hooks().committed.append(fn)

    def on_rollback(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the database thread if the ``update`` in progress rolls back."""
        self._current_hooks().rolled_back.append(fn)

    def _current_hooks(self) -> _Hooks:
        if not self.in_update():
            raise RuntimeError("no update in progress on this thread")
        assert self._hooks is not None
        return self._hooks

    def _update_inline(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        hooks = self._hooks = _Hooks()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                _run_hooks(hooks.rolled_back)
                raise
        finally:
            self._hooks = None
        _run_hooks(hooks.committed)
        return result

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FailedPrecondition("metadata database is closed")
        return self._conn

    async def _run(self, fn: Callable[[], T]) -> T:
        return await self._worker.run(fn)


def _run_hooks(hooks: list[Callable[[], object]]) -> None:
    for hook in hooks:
        try:
            hook()
        except Exception:
            log.exception("metadata transaction hook %r failed", hook)
