"""Garbage collection, the metadata half: mark what is reachable, delete the rest's rows.

Roots (as in containerd's ``metadata/gc.go``): every image's target; every container's
snapshot; every resource of a lease that has not expired; content and snapshots
labelled ``containerd.io/gc.root``; ingests that have not expired. Edges: a snapshot's
parent, and the labels ``containerd.io/gc.ref.content[.<x>]`` (a digest) and
``containerd.io/gc.ref.snapshot.<snapshotter>[/<x>]`` (a key) on content, snapshots and
containers. A lease labelled ``containerd.io/gc.flat`` keeps its resources but does not
follow their references. Everything is per namespace.

``collect`` runs in one write transaction: it marks, deletes the rows of unreachable
content, snapshots, ingests and expired leases, and reports what it removed so the
caller can reclaim disk space in the backends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pycontainerd import labels as labelsmod
from pycontainerd.metadata import leases

if TYPE_CHECKING:
    import sqlite3

GC_ROOT = "containerd.io/gc.root"
REF_CONTENT = "containerd.io/gc.ref.content"
REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."

Node = tuple[str, str, str, str]  # (kind, namespace, snapshotter or "", id)


@dataclass(slots=True)
class Collected:
    """Rows removed by one collection."""

    content: list[tuple[str, str]] = field(default_factory=list)  # (namespace, digest)
    snapshots: list[tuple[str, str, str]] = field(default_factory=list)  # (ns, snapshotter, key)
    ingests: list[tuple[str, str]] = field(default_factory=list)  # (namespace, ref)
    leases: list[tuple[str, str]] = field(default_factory=list)  # (namespace, id)

    @property
    def empty(self) -> bool:
        return not (self.content or self.snapshots or self.ingests or self.leases)


def _label_refs(ns: str, labels: dict[str, str]) -> list[Node]:
    out: list[Node] = []
    for k, v in labels.items():
        if not v:
            continue
        if k == REF_CONTENT or k.startswith(REF_CONTENT + "."):
            out.append(("content", ns, "", v))
        elif k.startswith(REF_SNAPSHOT):
            snapshotter = k[len(REF_SNAPSHOT) :].split("/", 1)[0]
            if snapshotter:
                out.append(("snapshot", ns, snapshotter, v))
    return out


def collect(conn: sqlite3.Connection, now: int) -> Collected:
    """Mark from the roots and delete every unreachable row; see the module docstring."""
    content_labels = {
        (ns, dg): labelsmod.loads(lab)
        for ns, dg, lab in conn.execute("SELECT namespace, digest, labels FROM content")
    }
    snapshots = {
        (ns, sn, key): (parent, labelsmod.loads(lab))
        for ns, sn, key, parent, lab in conn.execute(
            "SELECT namespace, snapshotter, key, parent, labels FROM snapshots"
        )
    }
    ingests = {
        (ns, ref): (exp, expected)
        for ns, ref, exp, expected in conn.execute(
            "SELECT namespace, ref, expires_at, expected FROM ingests"
        )
    }

    live: set[Node] = set()
    # A node reached only through a gc.flat lease is kept with its parents, but its label
    # references are not followed; reached any other way too, it is followed in full.
    followed: set[Node] = set()
    queue: deque[tuple[Node, bool]] = deque()

    def mark(node: Node, follow: bool = True) -> None:
        if node in followed or (not follow and node in live):
            return
        live.add(node)
        if follow:
            followed.add(node)
        queue.append((node, follow))

    for ns, dg in conn.execute("SELECT namespace, digest FROM images"):
        mark(("content", ns, "", dg))
    for ns, sn, key, lab in conn.execute(
        "SELECT namespace, snapshotter, snapshot_key, labels FROM containers"
    ):
        if sn and key:
            mark(("snapshot", ns, sn, key))
        for ref in _label_refs(ns, labelsmod.loads(lab)):
            mark(ref)
    expired = set(leases.expired(conn, now))
    flat_leases = {
        (ns, lid)
        for ns, lid, lab in conn.execute("SELECT namespace, id, labels FROM leases")
        if leases.FLAT_LABEL in labelsmod.loads(lab)
    }
    for ns, lid, typ, rid in conn.execute("SELECT namespace, lease, type, id FROM lease_resources"):
        if (ns, lid) in expired:
            continue
        follow = (ns, lid) not in flat_leases
        if typ == "content":
            mark(("content", ns, "", rid), follow)
        elif typ == "ingests":
            mark(("ingest", ns, "", rid), follow)
        elif typ.startswith("snapshots/"):
            mark(("snapshot", ns, typ[len("snapshots/") :], rid), follow)
    for (ns, dg), lab in content_labels.items():
        if GC_ROOT in lab:
            mark(("content", ns, "", dg))
    for (ns, sn, key), (_, lab) in snapshots.items():
        if GC_ROOT in lab:
            mark(("snapshot", ns, sn, key))
    for (ns, ref), (exp, _) in ingests.items():
        # An ingest with no expiry lives only through its lease (as in containerd).
        if exp and exp > now:
            mark(("ingest", ns, "", ref))

    while queue:
        (kind, ns, sn, ident), follow = queue.popleft()
        if kind == "content":
            if follow:
                for ref in _label_refs(ns, content_labels.get((ns, ident), {})):
                    mark(ref)
        elif kind == "snapshot":
            entry = snapshots.get((ns, sn, ident))
            if entry is None:
                continue
            parent, lab = entry
            if parent:
                mark(("snapshot", ns, sn, parent), follow)
            if follow:
                for ref in _label_refs(ns, lab):
                    mark(ref)
        elif kind == "ingest":
            # An ingest holds on to the blob it expects to become.
            expected = ingests.get((ns, ident), (0, ""))[1]
            if expected:
                mark(("content", ns, "", expected))

    out = Collected()
    for ns, dg in content_labels:
        if ("content", ns, "", dg) not in live:
            out.content.append((ns, dg))
    for ns, sn, key in snapshots:
        if ("snapshot", ns, sn, key) not in live:
            out.snapshots.append((ns, sn, key))
    for ns, ref in ingests:
        if ("ingest", ns, "", ref) not in live:
            out.ingests.append((ns, ref))
    out.leases = sorted(expired)

    conn.executemany("DELETE FROM content WHERE namespace = ? AND digest = ?", out.content)
    conn.executemany(
        "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", out.snapshots
    )
    conn.executemany("DELETE FROM ingests WHERE namespace = ? AND ref = ?", out.ingests)
    for ns, lid in out.leases:
        leases.delete(conn, ns, lid)
    return out


def referenced_digests(conn: sqlite3.Connection) -> set[str]:
    """Every digest some namespace still holds (blob files outside this set are garbage)."""
    return {dg for (dg,) in conn.execute("SELECT DISTINCT digest FROM content")}
