"""Lease records and their resources. Closures here run inside ``MetadataDB`` transactions.

A lease protects what it references from garbage collection until it is deleted or its
``containerd.io/gc.expire`` label (RFC 3339) passes. Resource types are ``content``
(a digest), ``ingests`` (an ingest ref) and ``snapshots/<snapshotter>`` (a key).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import datetime

from pycontainerd import labels as labelsmod
from pycontainerd.errdefs import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from pycontainerd.metadata import namespaces

EXPIRE_LABEL = "containerd.io/gc.expire"
FLAT_LABEL = "containerd.io/gc.flat"


@dataclass(slots=True)
class Lease:
    id: str
    created_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    def expires_at(self) -> int | None:
        """Expiry in ns since the epoch, or None (no label, or a value that does not parse)."""
        return parse_expiry(self.labels.get(EXPIRE_LABEL))


@dataclass(frozen=True, slots=True)
class Resource:
    id: str
    type: str


def parse_expiry(value: str | None) -> int | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return int(dt.timestamp() * 1_000_000_000)


def validate_resource(r: Resource) -> None:
    if not r.id:
        raise InvalidArgument("resource id must not be empty")
    if r.type == "content":
        from pycontainerd import digests

        digests.validate(r.id)
    elif r.type == "ingests":
        pass
    elif r.type.startswith("snapshots/"):
        if not r.type[len("snapshots/") :]:
            raise InvalidArgument(f"invalid resource type {r.type!r}")
    elif not r.type:
        raise InvalidArgument("resource type must not be empty")
    else:
        raise Unimplemented(f"unsupported resource type {r.type!r}")


def create(conn: sqlite3.Connection, ns: str, lease: Lease) -> Lease:
    namespaces.ensure(conn, ns)
    lease.created_at = lease.created_at or namespaces.now_ns()
    try:
        conn.execute(
            "INSERT INTO leases(namespace, id, labels, created_at) VALUES (?, ?, ?, ?)",
            (ns, lease.id, labelsmod.dumps(lease.labels), lease.created_at),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"lease {lease.id!r}") from None
    return lease


def get(conn: sqlite3.Connection, ns: str, lease_id: str) -> Lease | None:
    row = conn.execute(
        "SELECT created_at, labels FROM leases WHERE namespace = ? AND id = ?", (ns, lease_id)
    ).fetchone()
    if row is None:
        return None
    return Lease(lease_id, row[0], labelsmod.loads(row[1]))


def require(conn: sqlite3.Connection, ns: str, lease_id: str) -> Lease:
    lease = get(conn, ns, lease_id)
    if lease is None:
        raise NotFound(f"lease {lease_id!r}")
    return lease


def list_all(conn: sqlite3.Connection, ns: str) -> list[Lease]:
    rows = conn.execute(
        "SELECT id, created_at, labels FROM leases WHERE namespace = ? ORDER BY created_at, id",
        (ns,),
    ).fetchall()
    return [Lease(r[0], r[1], labelsmod.loads(r[2])) for r in rows]


def delete(conn: sqlite3.Connection, ns: str, lease_id: str) -> None:
    require(conn, ns, lease_id)
    conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ?", (ns, lease_id))
    conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (ns, lease_id))


def add_resource(conn: sqlite3.Connection, ns: str, lease_id: str, r: Resource) -> None:
    validate_resource(r)
    require(conn, ns, lease_id)
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
        (ns, lease_id, r.type, r.id),
    )


def delete_resource(conn: sqlite3.Connection, ns: str, lease_id: str, r: Resource) -> None:
    validate_resource(r)
    require(conn, ns, lease_id)
    conn.execute(
        "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND id = ?",
        (ns, lease_id, r.type, r.id),
    )


def list_resources(conn: sqlite3.Connection, ns: str, lease_id: str) -> list[Resource]:
    require(conn, ns, lease_id)
    rows = conn.execute(
        "SELECT id, type FROM lease_resources WHERE namespace = ? AND lease = ? ORDER BY type, id",
        (ns, lease_id),
    ).fetchall()
    return [Resource(r[0], r[1]) for r in rows]


def add_current(
    conn: sqlite3.Connection, ns: str, lease_id: str | None, type_: str, id_: str
) -> None:
    """Record ``id_`` under the request's lease, if any; NotFound for an unknown lease."""
    if not lease_id:
        return
    if get(conn, ns, lease_id) is None:
        raise NotFound(f"lease {lease_id!r}: lease does not exist")
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
        (ns, lease_id, type_, id_),
    )


def expired(conn: sqlite3.Connection, now: int) -> list[tuple[str, str]]:
    """(namespace, id) of every lease whose gc.expire label has passed."""
    out: list[tuple[str, str]] = []
    for ns, lid, text in conn.execute("SELECT namespace, id, labels FROM leases").fetchall():
        exp = parse_expiry(labelsmod.loads(text).get(EXPIRE_LABEL))
        if exp is not None and exp <= now:
            out.append((ns, lid))
    return out


def next_expiry(conn: sqlite3.Connection) -> int | None:
    soonest: int | None = None
    for (text,) in conn.execute("SELECT labels FROM leases").fetchall():
        exp = parse_expiry(labelsmod.loads(text).get(EXPIRE_LABEL))
        if exp is not None and (soonest is None or exp < soonest):
            soonest = exp
    return soonest
