"""A backend snapshotter's own metadata: one table of sqlite rows, one per snapshot.

Schema (``<table>`` is the store's table name)::

    <table>(id INTEGER PRIMARY KEY AUTOINCREMENT,   -- names the directory snapshots/<id>
            key TEXT UNIQUE, parent_id -> <table>.id, kind, labels JSON,
            created_at, updated_at,                 -- nanoseconds since the epoch
            size, inodes)                           -- usage, recorded at commit

``AUTOINCREMENT`` matters: ids name directories, and an id must never be reused, or a
stale directory could be mistaken for a new snapshot. Committing keeps the id and renames
the key, so the committed snapshot's directory is the active one's.

The table lives in one of two places:

- ``FileStore``: a sqlite file (WAL) of the snapshotter's own, ``metadata.db`` in its
  root, as containerd's snapshotters keep theirs. A standalone snapshotter uses it.
- ``SharedStore``: a table of the daemon's metadata database. In the daemon the backend
  work of a Prepare or Commit runs inside the namespaced layer's transaction on the
  database thread, so sharing the database makes the two one transaction: one commit and
  one fsync where two files took two, and a failure leaves neither store changed. The
  first open moves a root's ``metadata.db`` into the table; a root the table does not
  describe gets its rows written back to its old root's file first (``root_path``
  changed), so each root keeps its own snapshots, as with containerd.

Everything here is synchronous and runs on a worker thread (or the database thread).
``read(fn)`` and ``write(fn)`` run ``fn`` with a ``Txn`` inside one transaction; a write
commits when ``fn`` returns and rolls back when it raises.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pycontainerd import labels as labelutil
from pycontainerd.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from pycontainerd.snapshots.snapshotter import Info, Kind, Usage

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from pycontainerd.metadata.db import MetadataDB

__all__ = ["FileStore", "MetaStore", "SharedStore", "Snapshot", "Txn"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The table of a FileStore.
FILE_TABLE = "snapshots"
# Which root each SharedStore table describes.
_ROOTS_TABLE = "snapshotter_roots"


class _Sql:
    """The statements of one snapshot table."""

    def __init__(self, table: str) -> None:
        if not table.isidentifier():
            raise ValueError(f"bad snapshot table name {table!r}")
        t = table
        self.table = t
        self.schema = (
            f"CREATE TABLE IF NOT EXISTS {t} ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " key TEXT NOT NULL UNIQUE,"
            f" parent_id INTEGER REFERENCES {t}(id),"
            " kind INTEGER NOT NULL,"
            " labels TEXT NOT NULL DEFAULT '{}',"
            " created_at INTEGER NOT NULL,"
            " updated_at INTEGER NOT NULL,"
            " size INTEGER NOT NULL DEFAULT 0,"
            " inodes INTEGER NOT NULL DEFAULT 0)",
            f"CREATE INDEX IF NOT EXISTS {t}_by_parent ON {t}(parent_id)",
        )
        self.lookup = f"SELECT id, kind, parent_id FROM {t} WHERE key = ?"
        # The parent chain of a snapshot, nearest first, in one query.
        self.chain = (
            "WITH RECURSIVE chain(id, parent_id, depth) AS ("
            f" SELECT id, parent_id, 0 FROM {t} WHERE id = ?"
            " UNION ALL"
            f" SELECT s.id, s.parent_id, chain.depth + 1 FROM {t} s"
            " JOIN chain ON s.id = chain.parent_id)"
            " SELECT id FROM chain ORDER BY depth"
        )
        info = (
            "SELECT s.id, s.key, s.kind, p.key, s.labels, s.created_at, s.updated_at,"
            f" s.size, s.inodes FROM {t} s LEFT JOIN {t} p ON p.id = s.parent_id"
        )
        self.info = f"{info} WHERE s.key = ?"
        self.walk = f"{info} ORDER BY s.key"
        self.insert = (
            f"INSERT INTO {t} (key, parent_id, kind, labels, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
        )
        self.commit = (
            f"UPDATE {t} SET key = ?, kind = ?, labels = ?, created_at = ?, updated_at = ?,"
            " size = ?, inodes = ? WHERE id = ?"
        )
        self.child = f"SELECT 1 FROM {t} WHERE parent_id = ? LIMIT 1"
        self.delete = f"DELETE FROM {t} WHERE id = ?"
        self.set_labels = f"UPDATE {t} SET labels = ?, updated_at = ? WHERE id = ?"
        self.ids = f"SELECT id FROM {t}"
        self.rows = (
            "SELECT id, key, parent_id, kind, labels, created_at, updated_at, size, inodes"
            f" FROM {t} ORDER BY id"
        )
        self.put_row = (
            f"INSERT OR IGNORE INTO {t} (id, key, parent_id, kind, labels, created_at,"
            " updated_at, size, inodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An active snapshot or view as the snapshotter needs it to build mounts."""

    id: str
    kind: Kind
    parent_ids: tuple[str, ...] = ()  # nearest parent first


def _row_info(row: tuple[Any, ...]) -> tuple[str, Info, Usage]:
    sid, key, kind, parent, labels, created, updated, size, inodes = row
    info = Info(
        name=str(key),
        kind=Kind(int(kind)),
        parent=str(parent or ""),
        labels=labelutil.loads(str(labels)),
        created_at=int(created),
        updated_at=int(updated),
    )
    return str(sid), info, Usage(int(size), int(inodes))


class Txn:
    """The snapshot table's operations inside one transaction."""

    __slots__ = ("conn", "sql")

    def __init__(self, conn: sqlite3.Connection, sql: _Sql) -> None:
        self.conn = conn
        self.sql = sql

    def lookup(self, key: str) -> tuple[int, int, int | None] | None:
        row = self.conn.execute(self.sql.lookup, (key,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), row[2])

    def _chain(self, sid: int) -> tuple[str, ...]:
        return tuple(str(r[0]) for r in self.conn.execute(self.sql.chain, (sid,)))

    def get_info(self, key: str) -> tuple[str, Info, Usage]:
        """``(id, info, recorded usage)`` of ``key``; NotFound if unknown."""
        row = self.conn.execute(self.sql.info, (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return _row_info(row)

    def get_snapshot(self, key: str) -> Snapshot:
        """The active snapshot or view ``key`` with its parent chain; FailedPrecondition
        for a committed one."""
        found = self.lookup(key)
        if found is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        sid, kind, parent_id = found
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"requested snapshot {key!r} not active or view")
        parents = self._chain(parent_id) if parent_id is not None else ()
        return Snapshot(str(sid), Kind(kind), parents)

    def parent_id(self, parent: str) -> str:
        """The id of the committed snapshot ``parent`` (NotFound / InvalidArgument
        otherwise)."""
        found = self.lookup(parent)
        if found is None:
            raise NotFound(f"parent snapshot {parent!r} does not exist")
        if found[1] != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return str(found[0])

    def create_snapshot(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> Snapshot:
        """Insert an active snapshot or view of ``parent``; returns it with its new id."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot kind {kind.label} cannot be created directly")
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        pid: int | None = None
        if parent:
            pid = int(self.parent_id(parent))
        now = time.time_ns()
        try:
            cur = self.conn.execute(
                self.sql.insert, (key, pid, int(kind), labelutil.dumps(labels), now, now)
            )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"snapshot {key!r}") from exc
        sid = cur.lastrowid
        assert sid is not None
        return Snapshot(str(sid), kind, self._chain(pid) if pid is not None else ())

    def commit_active(self, key: str, name: str, usage: Usage, labels: Mapping[str, str]) -> str:
        """Rename the active snapshot ``key`` to the committed ``name``; returns its id.

        Labels are replaced, not inherited, and the timestamps restart, as in containerd.
        """
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        if self.lookup(name) is not None:
            raise AlreadyExists(f"committed snapshot {name!r}")
        found = self.lookup(key)
        if found is None:
            raise NotFound(f"active snapshot {key!r} does not exist")
        sid, kind, _ = found
        if kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        now = time.time_ns()
        self.conn.execute(
            self.sql.commit,
            (
                name,
                int(Kind.COMMITTED),
                labelutil.dumps(labels),
                now,
                now,
                usage.size,
                usage.inodes,
                sid,
            ),
        )
        return str(sid)

    def remove(self, key: str) -> tuple[str, Kind]:
        """Delete ``key`` (FailedPrecondition if it has children); returns its id and
        kind."""
        found = self.lookup(key)
        if found is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        sid, kind, _ = found
        if self.conn.execute(self.sql.child, (sid,)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")
        self.conn.execute(self.sql.delete, (sid,))
        return str(sid), Kind(kind)

    def update_info(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        """Replace or patch the labels of ``info.name``; other field paths are
        InvalidArgument."""
        sid, current, _ = self.get_info(info.name)
        if fieldpaths:
            new_labels = labelutil.apply_paths(
                current.labels, info.labels, fieldpaths, f"snapshot {info.name!r}"
            )
            if new_labels is None:
                new_labels = dict(current.labels)
        else:
            new_labels = labelutil.validate(info.labels)
        now = time.time_ns()
        self.conn.execute(self.sql.set_labels, (labelutil.dumps(new_labels), now, int(sid)))
        return Info(
            name=current.name,
            kind=current.kind,
            parent=current.parent,
            labels=new_labels,
            created_at=current.created_at,
            updated_at=now,
        )

    def walk(self) -> list[Info]:
        """Every snapshot, ordered by key."""
        return [_row_info(r)[1] for r in self.conn.execute(self.sql.walk).fetchall()]

    def ids(self) -> set[str]:
        """The ids (directory names) of all snapshots."""
        return {str(r[0]) for r in self.conn.execute(self.sql.ids)}

    # --- moving a table between stores ----------------------------------------------------

    def rows(self) -> list[tuple[Any, ...]]:
        return self.conn.execute(self.sql.rows).fetchall()

    def put_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert whole rows, ids kept (rows already there are left as they are)."""
        self.conn.executemany(self.sql.put_row, rows)

    def sequence(self) -> int:
        """The highest id ever handed out."""
        row = self.conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (self.sql.table,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def raise_sequence(self, seq: int) -> None:
        """Make the next id greater than ``seq`` (ids are never handed out twice)."""
        if seq <= self.sequence():
            return
        table = self.sql.table
        cur = self.conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (seq, table))
        if cur.rowcount == 0:
            self.conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, seq))

    def clear(self) -> None:
        self.conn.execute(f"DELETE FROM {self.sql.table}")


class MetaStore:
    """Where a backend snapshotter keeps its snapshot table (see the module docstring)."""

    # Whether writes made on the metadata database's thread join the transaction in
    # progress there (SharedStore) rather than commit on their own (FileStore).
    shares_transactions = False

    def read(self, fn: Callable[[Txn], T]) -> T:
        """``fn`` in a read transaction."""
        raise NotImplementedError

    def write(self, fn: Callable[[Txn], T]) -> T:
        """``fn`` in a write transaction (or a savepoint of the one in progress)."""
        raise NotImplementedError

    def on_rollback(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` if the write just made is undone after all: it joined a transaction
        that rolls back later. A write that committed on its own is never undone."""

    def after_commit(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` once the write just made is committed (now, if it is)."""
        fn()

    def close(self) -> None:
        """Release the store."""


def _open_file(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class FileStore(MetaStore):
    """The table in a sqlite file of its own. One connection serves all threads under
    one lock held for the whole transaction, which also orders directory creation
    against ``cleanup``."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._lock = threading.Lock()
        self._sql = _Sql(FILE_TABLE)
        conn = _open_file(path, synchronous)
        for stmt in self._sql.schema:
            conn.execute(stmt)
        self._conn: sqlite3.Connection | None = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def read(self, fn: Callable[[Txn], T]) -> T:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                return fn(Txn(conn, self._sql))
            finally:
                conn.execute("COMMIT")

    def write(self, fn: Callable[[Txn], T]) -> T:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(Txn(conn, self._sql))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FailedPrecondition("snapshotter metastore is closed")
        return self._conn


class SharedStore(MetaStore):
    """The table in the daemon's metadata database (see the module docstring).

    Writes from the database thread join its transaction as a savepoint; writes from
    other threads are transactions of their own on the database thread, and so are
    their reads.
    """

    shares_transactions = True

    def __init__(self, db: MetadataDB, table: str) -> None:
        self._db = db
        self._sql = _Sql(table)

    @classmethod
    def open(cls, db: MetadataDB, table: str, root: Path, snapshots_dir: Path) -> SharedStore:
        """The store of the snapshotter at ``root`` (runs on a worker thread): creates
        the table, moves ``root``'s own ``metadata.db`` into it, and keeps ids above the
        names of the directories already in ``snapshots_dir``."""
        store = cls(db, table)
        sql = store._sql
        legacy = root / "metadata.db"
        here = str(root.resolve())

        def setup(conn: sqlite3.Connection) -> str:
            for stmt in sql.schema:
                conn.execute(stmt)
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_ROOTS_TABLE}"
                " (name TEXT PRIMARY KEY, root TEXT NOT NULL)"
            )
            row = conn.execute(
                f"SELECT root FROM {_ROOTS_TABLE} WHERE name = ?", (table,)
            ).fetchone()
            return here if row is None else str(row[0])

        before = db.update_sync(setup)
        if before != here:
            store._hand_back(Path(before))
        moved = _read_file(legacy) if legacy.exists() else None
        highest = max((int(d) for d in os.listdir(snapshots_dir) if d.isdigit()), default=0)

        def adopt(conn: sqlite3.Connection) -> None:
            tx = Txn(conn, sql)
            if moved is not None:
                tx.put_rows(moved[0])
                tx.raise_sequence(moved[1])
            tx.raise_sequence(highest)
            conn.execute(
                f"INSERT OR REPLACE INTO {_ROOTS_TABLE} (name, root) VALUES (?, ?)",
                (table, here),
            )

        db.update_sync(adopt)
        if moved is not None:
            # Committed above: the file's rows live on in the table (moving them again
            # after a crash here changes nothing, rows are kept by id).
            for suffix in ("", "-wal", "-shm"):
                with_suffix = legacy.with_name(legacy.name + suffix)
                if with_suffix.exists():
                    with_suffix.unlink()
            log.info("snapshotter metadata %s moved into table %s", legacy, table)
        return store

    def _hand_back(self, old_root: Path) -> None:
        """The table describes ``old_root``, not this root: write its rows back to a
        ``metadata.db`` there (where the next ``open`` at that root finds them), then
        empty the table."""
        sql = self._sql
        rows, seq = self._db.view_sync(lambda conn: _contents(Txn(conn, sql)))
        if old_root.is_dir():
            store = FileStore(old_root / "metadata.db")
            try:

                def put(tx: Txn) -> None:
                    tx.put_rows(rows)
                    tx.raise_sequence(seq)

                store.write(put)
            finally:
                store.close()
            log.warning(
                "snapshotter table %s held the snapshots of %s; they are back in its metadata.db",
                sql.table,
                old_root,
            )
        elif rows:
            log.warning(
                "snapshotter table %s held %d snapshots of %s, which is gone; dropped",
                sql.table,
                len(rows),
                old_root,
            )
        self._db.update_sync(lambda conn: Txn(conn, sql).clear())

    def read(self, fn: Callable[[Txn], T]) -> T:
        sql = self._sql
        # A hop to the database thread (inline when already there) rather than read_sync:
        # that would keep a connection, three descriptors, open for every thread that
        # ever reads.
        return self._db.view_sync(lambda conn: fn(Txn(conn, sql)))

    def write(self, fn: Callable[[Txn], T]) -> T:
        sql = self._sql
        return self._db.write_sync(lambda conn: fn(Txn(conn, sql)))

    def on_rollback(self, fn: Callable[[], object]) -> None:
        if self._db.in_update():
            self._db.on_rollback(fn)

    def after_commit(self, fn: Callable[[], object]) -> None:
        if self._db.in_update():
            self._db.after_commit(fn)
        else:
            fn()


def _read_file(path: Path) -> tuple[list[tuple[Any, ...]], int]:
    """The rows and id sequence of a FileStore's file."""
    store = FileStore(path)
    try:
        return store.read(_contents)
    finally:
        store.close()


def _contents(tx: Txn) -> tuple[list[tuple[Any, ...]], int]:
    return tx.rows(), tx.sequence()
