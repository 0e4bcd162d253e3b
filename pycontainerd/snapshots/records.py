"""SQL of the namespaced snapshot layer over the metadata tables ``snapshots`` and
``lease_resources`` (schema in ``pycontainerd.metadata.schema``).

Plain synchronous functions on a connection, called inside ``MetadataDB`` transactions
by ``pycontainerd.snapshots.metadata``. A row is keyed by (namespace, snapshotter, key);
``parent`` holds the parent's namespaced key, ``backend_key`` the key in the snapshotter.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pycontainerd import labels as labelutil
from pycontainerd.errdefs import AlreadyExists, NotFound
from pycontainerd.snapshots.snapshotter import Info, Kind

if TYPE_CHECKING:
    from collections.abc import Mapping

_COLUMNS = "key, backend_key, parent, kind, labels, created_at, updated_at"
_WHERE_KEY = "namespace = ? AND snapshotter = ? AND key = ?"


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    backend_key: str
    parent: str
    kind: Kind
    labels: dict[str, str]
    created_at: int
    updated_at: int

    def info(self) -> Info:
        return Info(
            name=self.key,
            kind=self.kind,
            parent=self.parent,
            labels=self.labels,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


def _from_tuple(r: tuple[str, str, str, int, str, int, int]) -> Row:
    return Row(r[0], r[1], r[2], Kind(r[3]), labelutil.loads(r[4]), int(r[5]), int(r[6]))


def get(conn: sqlite3.Connection, ns: str, sn: str, key: str) -> Row | None:
    r = conn.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE {_WHERE_KEY}", (ns, sn, key))
    found = r.fetchone()
    return None if found is None else _from_tuple(found)


def must(conn: sqlite3.Connection, ns: str, sn: str, key: str) -> Row:
    row = get(conn, ns, sn, key)
    if row is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    return row


def infos(conn: sqlite3.Connection, ns: str, sn: str) -> list[Info]:
    cur = conn.execute(
        f"SELECT {_COLUMNS} FROM snapshots WHERE namespace = ? AND snapshotter = ? ORDER BY key",
        (ns, sn),
    )
    return [_from_tuple(r).info() for r in cur]


def has_children(conn: sqlite3.Connection, ns: str, sn: str, key: str) -> bool:
    cur = conn.execute(
        "SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND parent = ? LIMIT 1",
        (ns, sn, key),
    )
    return cur.fetchone() is not None


def backend_keys(conn: sqlite3.Connection, sn: str) -> set[str]:
    """Every backend key of snapshotter ``sn`` referenced by any namespace."""
    cur = conn.execute("SELECT backend_key FROM snapshots WHERE snapshotter = ?", (sn,))
    return {r[0] for r in cur}


def insert(
    conn: sqlite3.Connection,
    ns: str,
    sn: str,
    key: str,
    backend_key: str,
    parent: str,
    kind: Kind,
    labels: Mapping[str, str],
) -> None:
    """Add a row (AlreadyExists if the key is taken); creates the namespace implicitly."""
    now = time.time_ns()
    conn.execute(
        "INSERT OR IGNORE INTO namespaces (name, labels, created_at, updated_at)"
        " VALUES (?, '{}', ?, ?)",
        (ns, now, now),
    )
    try:
        conn.execute(
            "INSERT INTO snapshots (namespace, snapshotter, key, backend_key, parent, kind,"
            " labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ns, sn, key, backend_key, parent, int(kind), labelutil.dumps(labels), now, now),
        )
    except sqlite3.IntegrityError as exc:
        raise AlreadyExists(f"snapshot {key!r}") from exc


def delete(conn: sqlite3.Connection, ns: str, sn: str, key: str, lease_type: str) -> None:
    """Drop the row and every lease reference to it."""
    conn.execute(f"DELETE FROM snapshots WHERE {_WHERE_KEY}", (ns, sn, key))
    conn.execute(
        "DELETE FROM lease_resources WHERE namespace = ? AND type = ? AND id = ?",
        (ns, lease_type, key),
    )


def set_labels(
    conn: sqlite3.Connection, ns: str, sn: str, key: str, labels: Mapping[str, str]
) -> int:
    """Replace the labels; returns the new ``updated_at``."""
    now = time.time_ns()
    conn.execute(
        f"UPDATE snapshots SET labels = ?, updated_at = ? WHERE {_WHERE_KEY}",
        (labelutil.dumps(labels), now, ns, sn, key),
    )
    return now


def lease_exists(conn: sqlite3.Connection, ns: str, lease: str) -> bool:
    cur = conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (ns, lease))
    return cur.fetchone() is not None


def require_lease(conn: sqlite3.Connection, ns: str, lease: str) -> None:
    if not lease_exists(conn, ns, lease):
        raise NotFound(f"lease {lease!r}")


def add_to_lease(conn: sqlite3.Connection, ns: str, lease: str, lease_type: str, key: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources (namespace, lease, type, id) VALUES (?, ?, ?, ?)",
        (ns, lease, lease_type, key),
    )
