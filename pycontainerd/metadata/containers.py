"""Container records. Closures here run inside ``MetadataDB`` transactions.

A container is the metadata a task is later started from: an id (an identifier), labels,
the image it came from, the runtime (name plus opaque options), the OCI spec, the
snapshotter and snapshot key of its root filesystem, and client extensions. The spec,
the runtime options and every extension are ``google.protobuf.Any`` values the daemon never
decodes: they are kept as ``AnyValue`` (type URL plus bytes) and stored serialized, so a
client gets back exactly the type URL and bytes it sent. The ``extensions`` column holds a
JSON object mapping each key to the base64 of its serialized ``Any``.

Rules (containerd's ``metadata/containers.go``): the id must be an identifier, the runtime
name and the spec are required, a snapshot key needs a snapshotter; labels with an empty
value are not stored. ``runtime`` and ``snapshotter`` are immutable: an update without
field paths must repeat them unchanged, and no field path names them. Update paths are
``labels``, ``labels.<k>``, ``spec``, ``extensions``, ``extensions.<k>``, ``image`` and
``snapshotkey``; no path means all of those. Containers are never added to a lease (a
container is itself a GC root, through its snapshot and its ``containerd.io/gc.ref.*``
labels).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from pycontainerd import identifiers
from pycontainerd import labels as labelsmod
from pycontainerd.errdefs import AlreadyExists, DataLoss, InvalidArgument, NotFound
from pycontainerd.metadata import namespaces

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Mapping, Sequence

__all__ = [
    "UPDATABLE_FIELDS",
    "AnyValue",
    "Container",
    "Runtime",
    "create",
    "delete",
    "get",
    "list_all",
    "update",
    "validate",
]

# The fields an update without field paths replaces (containerd's full-replace list).
UPDATABLE_FIELDS = ("labels", "spec", "extensions", "image", "snapshotkey")


@dataclass(frozen=True, slots=True)
class AnyValue:
    """An opaque ``google.protobuf.Any``: its type URL and payload, never interpreted."""

    type_url: str = ""
    value: bytes = b""

    def serialize(self) -> bytes:
        return any_pb2.Any(type_url=self.type_url, value=self.value).SerializeToString()

    @classmethod
    def parse(cls, data: bytes) -> AnyValue:
        msg = any_pb2.Any()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise DataLoss(f"stored Any is corrupt: {exc}") from exc
        return cls(msg.type_url, msg.value)


@dataclass(slots=True)
class Runtime:
    name: str = ""
    options: AnyValue | None = None


@dataclass(slots=True)
class Container:
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    runtime: Runtime = field(default_factory=Runtime)
    spec: AnyValue | None = None
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, AnyValue] = field(default_factory=dict)
    # containerd 1.7's sandbox id; the 1.6 API has no such field, so it stays empty.
    sandbox: str = ""
    created_at: int = 0
    updated_at: int = 0


_COLUMNS = (
    "id, labels, image, runtime_name, runtime_options, spec, snapshotter, snapshot_key,"
    " extensions, sandbox, created_at, updated_at"
)


def _opt_any(data: object) -> AnyValue | None:
    # NULL means "not set"; an empty blob is a set-but-empty Any and must stay one.
    return None if data is None else AnyValue.parse(bytes(data))  # type: ignore[call-overload]


def _dump_extensions(ext: Mapping[str, AnyValue]) -> bytes | None:
    if not ext:
        return None
    doc = {k: base64.b64encode(v.serialize()).decode() for k, v in ext.items()}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _load_extensions(data: object) -> dict[str, AnyValue]:
    if not data:
        return {}
    try:
        doc = json.loads(bytes(data))  # type: ignore[call-overload]
        return {str(k): AnyValue.parse(base64.b64decode(v)) for k, v in doc.items()}
    except (ValueError, TypeError) as exc:
        raise DataLoss(f"stored container extensions are corrupt: {exc}") from exc


def _row(r: Sequence[object]) -> Container:
    cid, lab, image, rname, ropts, spec, snapshotter, skey, ext, sandbox, ca, ua = r
    return Container(
        id=str(cid),
        labels=labelsmod.loads(str(lab)),
        image=str(image),
        runtime=Runtime(str(rname), _opt_any(ropts)),
        spec=_opt_any(spec),
        snapshotter=str(snapshotter),
        snapshot_key=str(skey),
        extensions=_load_extensions(ext),
        sandbox=str(sandbox),
        created_at=int(ca),  # type: ignore[call-overload]
        updated_at=int(ua),  # type: ignore[call-overload]
    )


def validate(c: Container) -> None:
    """Check ``c`` against containerd's rules; InvalidArgument naming the first violation.

    Also drops labels whose value is empty, as containerd does when it stores them.
    """
    try:
        identifiers.validate(c.id)
    except InvalidArgument as exc:
        raise InvalidArgument(f"container.ID: {exc.message}") from None
    if any(not k for k in c.extensions):
        raise InvalidArgument("container.Extension keys must not be zero-length")
    try:
        c.labels = {k: v for k, v in labelsmod.validate(c.labels).items() if v}
    except InvalidArgument as exc:
        raise InvalidArgument(f"containers.Labels: {exc.message}") from None
    if not c.runtime.name:
        raise InvalidArgument("container.Runtime.Name must be set")
    if c.spec is None:
        raise InvalidArgument("container.Spec must be set")
    if c.snapshot_key and not c.snapshotter:
        raise InvalidArgument("container.Snapshotter must be set if container.SnapshotKey is set")


def find(conn: sqlite3.Connection, ns: str, cid: str) -> Container | None:
    r = conn.execute(
        f"SELECT {_COLUMNS} FROM containers WHERE namespace = ? AND id = ?", (ns, cid)
    ).fetchone()
    return None if r is None else _row(r)


def get(conn: sqlite3.Connection, ns: str, cid: str) -> Container:
    found = find(conn, ns, cid)
    if found is None:
        raise NotFound(f'container "{cid}" in namespace "{ns}"')
    return found


def list_all(conn: sqlite3.Connection, ns: str) -> list[Container]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM containers WHERE namespace = ? ORDER BY id", (ns,)
    ).fetchall()
    return [_row(r) for r in rows]


def _write(conn: sqlite3.Connection, ns: str, c: Container) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO containers(namespace, {_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            ns,
            c.id,
            labelsmod.dumps(c.labels),
            c.image,
            c.runtime.name,
            None if c.runtime.options is None else c.runtime.options.serialize(),
            None if c.spec is None else c.spec.serialize(),
            c.snapshotter,
            c.snapshot_key,
            _dump_extensions(c.extensions),
            c.sandbox,
            c.created_at,
            c.updated_at,
        ),
    )


def _copy(c: Container) -> Container:
    return replace(
        c, labels=dict(c.labels), runtime=replace(c.runtime), extensions=dict(c.extensions)
    )


def create(conn: sqlite3.Connection, ns: str, container: Container) -> Container:
    """Store a new container; InvalidArgument, or AlreadyExists for a taken id."""
    new = _copy(container)
    try:
        validate(new)
    except InvalidArgument as exc:
        raise InvalidArgument(f"create container failed validation: {exc.message}") from None
    namespaces.ensure(conn, ns)
    if find(conn, ns, new.id) is not None:
        raise AlreadyExists(f'container "{new.id}"')
    new.created_at = new.updated_at = namespaces.now_ns()
    _write(conn, ns, new)
    return new


def update(
    conn: sqlite3.Connection, ns: str, container: Container, paths: Sequence[str]
) -> Container:
    """Apply ``paths`` of ``container`` to the stored one (see the module docstring)."""
    if not container.id:
        raise InvalidArgument("must specify a container id")
    current = find(conn, ns, container.id)
    if current is None:
        raise NotFound(f'container "{container.id}"')
    new = _copy(current)
    if not paths:
        # Immutable fields must match on a full replace, so they may become mutable later
        # without changing what such a request means.
        if current.snapshotter != container.snapshotter:
            raise InvalidArgument("container.Snapshotter field is immutable")
        if current.runtime.name != container.runtime.name:
            raise InvalidArgument("container.Runtime.Name field is immutable")
        paths = UPDATABLE_FIELDS
    for path in paths:
        if path.startswith("labels."):
            key = path[len("labels.") :]
            # An empty value removes the label when it is stored.
            new.labels[key] = container.labels.get(key, "")
        elif path.startswith("extensions."):
            key = path[len("extensions.") :]
            if key in container.extensions:
                new.extensions[key] = container.extensions[key]
            else:
                new.extensions.pop(key, None)
        elif path == "labels":
            new.labels = dict(container.labels)
        elif path == "spec":
            new.spec = container.spec
        elif path == "extensions":
            new.extensions = dict(container.extensions)
        elif path == "image":
            new.image = container.image
        elif path == "snapshotkey":
            new.snapshot_key = container.snapshot_key
        else:
            raise InvalidArgument(f'cannot update "{path}" field on "{container.id}"')
    try:
        validate(new)
    except InvalidArgument as exc:
        raise InvalidArgument(f"update failed validation: {exc.message}") from None
    new.updated_at = namespaces.now_ns()
    _write(conn, ns, new)
    return new


def delete(conn: sqlite3.Connection, ns: str, cid: str) -> None:
    """Remove a container record; NotFound when there is none."""
    cur = conn.execute("DELETE FROM containers WHERE namespace = ? AND id = ?", (ns, cid))
    if cur.rowcount == 0:
        raise NotFound(f"container {cid}")
