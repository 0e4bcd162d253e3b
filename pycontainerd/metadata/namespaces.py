"""Namespace records. Closures here run inside ``MetadataDB`` transactions.

A namespace exists once created explicitly or by the first write made in it: every
store that writes namespaced rows calls ``ensure`` in the same transaction.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field

from pycontainerd import labels as labelsmod
from pycontainerd.errdefs import AlreadyExists, FailedPrecondition, NotFound

# Tables holding namespaced objects, with the word containerd uses for them when a
# non-empty namespace cannot be deleted.
_CONTENTS = (
    ("images", "images"),
    ("content", "blobs"),
    ("containers", "containers"),
)


@dataclass(slots=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


def now_ns() -> int:
    return time.time_ns()


def ensure(conn: sqlite3.Connection, name: str) -> None:
    """Create namespace ``name`` if it does not exist yet (implicit creation)."""
    t = now_ns()
    conn.execute(
        "INSERT OR IGNORE INTO namespaces(name, labels, created_at, updated_at)"
        " VALUES (?, '{}', ?, ?)",
        (name, t, t),
    )


def create(conn: sqlite3.Connection, ns: Namespace) -> Namespace:
    t = now_ns()
    try:
        conn.execute(
            "INSERT INTO namespaces(name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)",
            (ns.name, labelsmod.dumps(ns.labels), t, t),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f'namespace "{ns.name}"') from None
    return ns


def get(conn: sqlite3.Connection, name: str) -> Namespace | None:
    row = conn.execute("SELECT labels FROM namespaces WHERE name = ?", (name,)).fetchone()
    if row is None:
        return None
    return Namespace(name, labelsmod.loads(row[0]))


def list_all(conn: sqlite3.Connection) -> list[Namespace]:
    rows = conn.execute("SELECT name, labels FROM namespaces ORDER BY name").fetchall()
    return [Namespace(r[0], labelsmod.loads(r[1])) for r in rows]


def set_labels(conn: sqlite3.Connection, name: str, labels: dict[str, str]) -> None:
    ensure(conn, name)
    conn.execute(
        "UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
        (labelsmod.dumps(labels), now_ns(), name),
    )


def delete(conn: sqlite3.Connection, name: str) -> None:
    """Delete an empty namespace; FailedPrecondition naming what it still holds."""
    if get(conn, name) is None:
        raise NotFound(f'namespace "{name}"')
    kinds = [
        word
        for table, word in _CONTENTS
        if conn.execute(f"SELECT 1 FROM {table} WHERE namespace = ? LIMIT 1", (name,)).fetchone()
    ]
    for (snapshotter,) in conn.execute(
        "SELECT DISTINCT snapshotter FROM snapshots WHERE namespace = ? ORDER BY snapshotter",
        (name,),
    ).fetchall():
        kinds.append(f'snapshots on "{snapshotter}" snapshotter')
    if kinds:
        raise FailedPrecondition(
            f'namespace "{name}" must be empty, but it still has ' + ", ".join(kinds)
        )
    # Leases and ingests do not keep a namespace alive; they go with it.
    for table in ("lease_resources", "leases", "ingests"):
        conn.execute(f"DELETE FROM {table} WHERE namespace = ?", (name,))
    conn.execute("DELETE FROM namespaces WHERE name = ?", (name,))
