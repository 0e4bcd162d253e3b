"""A backend snapshotter's own metadata: one sqlite file (WAL) in its root directory.

Schema::

    snapshots(id INTEGER PRIMARY KEY AUTOINCREMENT,   -- names the directory snapshots/<id>
              key TEXT UNIQUE, parent_id -> snapshots.id, kind, labels JSON,
              created_at, updated_at,                  -- nanoseconds since the epoch
              size, inodes)                            -- usage, recorded at commit

``AUTOINCREMENT`` matters: ids name directories, and an id must never be reused, or a
stale directory could be mistaken for a new snapshot. Committing keeps the id and renames
the key, so the committed snapshot's directory is the active one's.

Everything here is synchronous and runs on a worker thread. ``MetaStore.write()`` and
``read()`` hold one lock for the whole transaction (a single connection serves all
threads), which also orders directory creation against ``cleanup``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pycontainerd import labels as labelutil
from pycontainerd.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from pycontainerd.snapshots.snapshotter import Info, Kind, Usage

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from pathlib import Path

__all__ = ["MetaStore", "Snapshot"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent_id)
"""

# The parent chain of a snapshot, nearest first, in one query.
_CHAIN = """
WITH RECURSIVE chain(id, parent_id, depth) AS (
    SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
    UNION ALL
    SELECT s.id, s.parent_id, chain.depth + 1 FROM snapshots s JOIN chain ON s.id = chain.parent_id
)
SELECT id FROM chain ORDER BY depth
"""

_INFO_COLUMNS = "s.id, s.key, s.kind, p.key, s.labels, s.created_at, s.updated_at, s.size, s.inodes"
_INFO_FROM = "snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"


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


class MetaStore:
    """The sqlite metastore of one backend snapshotter."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._lock = threading.Lock()
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        self._conn: sqlite3.Connection | None = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commit on normal exit, roll back on an exception."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FailedPrecondition("snapshotter metastore is closed")
        return self._conn


# --- operations on a connection inside a transaction ----------------------------------


def lookup(conn: sqlite3.Connection, key: str) -> tuple[int, int, int | None] | None:
    row = conn.execute("SELECT id, kind, parent_id FROM snapshots WHERE key = ?", (key,)).fetchone()
    return None if row is None else (int(row[0]), int(row[1]), row[2])


def _chain(conn: sqlite3.Connection, sid: int) -> tuple[str, ...]:
    return tuple(str(r[0]) for r in conn.execute(_CHAIN, (sid,)))


def get_info(conn: sqlite3.Connection, key: str) -> tuple[str, Info, Usage]:
    """``(id, info, recorded usage)`` of ``key``; NotFound if unknown."""
    row = conn.execute(
        f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE s.key = ?", (key,)
    ).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    return _row_info(row)


def get_snapshot(conn: sqlite3.Connection, key: str) -> Snapshot:
    """The active snapshot or view ``key`` with its parent chain; FailedPrecondition otherwise."""
    found = lookup(conn, key)
    if found is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    sid, kind, parent_id = found
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise FailedPrecondition(f"requested snapshot {key!r} not active or view")
    parents = _chain(conn, parent_id) if parent_id is not None else ()
    return Snapshot(str(sid), Kind(kind), parents)


def parent_id(conn: sqlite3.Connection, parent: str) -> str:
    """The id of the committed snapshot ``parent`` (NotFound / InvalidArgument otherwise)."""
    found = lookup(conn, parent)
    if found is None:
        raise NotFound(f"parent snapshot {parent!r} does not exist")
    if found[1] != Kind.COMMITTED:
        raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
    return str(found[0])


def create_snapshot(
    conn: sqlite3.Connection, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
) -> Snapshot:
    """Insert an active snapshot or view of ``parent``; returns it with its new id."""
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise InvalidArgument(f"snapshot kind {kind.label} cannot be created directly")
    if not key:
        raise InvalidArgument("snapshot key must not be empty")
    pid: int | None = None
    if parent:
        pid = int(parent_id(conn, parent))
    now = time.time_ns()
    try:
        cur = conn.execute(
            "INSERT INTO snapshots (key, parent_id, kind, labels, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, pid, int(kind), labelutil.dumps(labels), now, now),
        )
    except sqlite3.IntegrityError as exc:
        raise AlreadyExists(f"snapshot {key!r}") from exc
    sid = cur.lastrowid
    assert sid is not None
    return Snapshot(str(sid), kind, _chain(conn, pid) if pid is not None else ())


def commit_active(
    conn: sqlite3.Connection, key: str, name: str, usage: Usage, labels: Mapping[str, str]
) -> str:
    """Rename the active snapshot ``key`` to the committed ``name``; returns its id.

    Labels are replaced, not inherited, and the timestamps restart, as in containerd.
    """
    if not name:
        raise InvalidArgument("committed snapshot name must not be empty")
    if lookup(conn, name) is not None:
        raise AlreadyExists(f"committed snapshot {name!r}")
    found = lookup(conn, key)
    if found is None:
        raise NotFound(f"active snapshot {key!r} does not exist")
    sid, kind, _ = found
    if kind != Kind.ACTIVE:
        raise FailedPrecondition(f"snapshot {key!r} is not active")
    now = time.time_ns()
    conn.execute(
        "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_at = ?, updated_at = ?,"
        " size = ?, inodes = ? WHERE id = ?",
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


def remove(conn: sqlite3.Connection, key: str) -> tuple[str, Kind]:
    """Delete ``key`` (FailedPrecondition if it has children); returns its id and kind."""
    found = lookup(conn, key)
    if found is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    sid, kind, _ = found
    if conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (sid,)).fetchone():
        raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")
    conn.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
    return str(sid), Kind(kind)


def update_info(conn: sqlite3.Connection, info: Info, fieldpaths: Sequence[str]) -> Info:
    """Replace or patch the labels of ``info.name``; other field paths are InvalidArgument."""
    sid, current, _ = get_info(conn, info.name)
    if fieldpaths:
        new_labels = labelutil.apply_paths(
            current.labels, info.labels, fieldpaths, f"snapshot {info.name!r}"
        )
        if new_labels is None:
            new_labels = dict(current.labels)
    else:
        new_labels = labelutil.validate(info.labels)
    now = time.time_ns()
    conn.execute(
        "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
        (labelutil.dumps(new_labels), now, int(sid)),
    )
    return Info(
        name=current.name,
        kind=current.kind,
        parent=current.parent,
        labels=new_labels,
        created_at=current.created_at,
        updated_at=now,
    )


def walk(conn: sqlite3.Connection) -> list[Info]:
    """Every snapshot, ordered by key."""
    rows = conn.execute(f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} ORDER BY s.key").fetchall()
    return [_row_info(r)[1] for r in rows]


def ids(conn: sqlite3.Connection) -> set[str]:
    """The ids (directory names) of all snapshots."""
    return {str(r[0]) for r in conn.execute("SELECT id FROM snapshots")}
