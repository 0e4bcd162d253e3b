"""Image records. Closures here run inside ``MetadataDB`` transactions.

An image is a name pointing at a target descriptor (usually a manifest or an index) plus
labels. Updates follow containerd's field paths: ``labels``, ``labels.<k>``, ``target``
(replaced as a unit), ``annotations``, ``annotations.<k>``; no path replaces everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pycontainerd import digests
from pycontainerd import labels as labelsmod
from pycontainerd.errdefs import AlreadyExists, InvalidArgument, NotFound
from pycontainerd.metadata import namespaces

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Sequence


@dataclass(slots=True)
class Descriptor:
    media_type: str = ""
    digest: str = ""
    size: int = 0
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Image:
    name: str
    target: Descriptor = field(default_factory=Descriptor)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


_COLUMNS = "name, media_type, digest, size, annotations, labels, created_at, updated_at"


def _row(r: Sequence[object]) -> Image:
    name, mt, dg, size, ann, lab, ca, ua = r
    return Image(
        str(name),
        Descriptor(str(mt), str(dg), int(size), labelsmod.loads(str(ann))),  # type: ignore[call-overload]
        labelsmod.loads(str(lab)),
        int(ca),  # type: ignore[call-overload]
        int(ua),  # type: ignore[call-overload]
    )


def validate(image: Image) -> None:
    if not image.name:
        raise InvalidArgument("image name must not be empty")
    labelsmod.validate(image.labels)
    t = image.target
    try:
        digests.validate(t.digest)
    except InvalidArgument as exc:
        raise InvalidArgument(f"Target.Digest {t.digest!r} invalid: {exc.message}") from None
    if t.size <= 0:
        raise InvalidArgument("Target.Size must be greater than zero")
    if not t.media_type:
        raise InvalidArgument("Target.MediaType must be set")


def get(conn: sqlite3.Connection, ns: str, name: str) -> Image:
    r = conn.execute(
        f"SELECT {_COLUMNS} FROM images WHERE namespace = ? AND name = ?", (ns, name)
    ).fetchone()
    if r is None:
        raise NotFound(f'image "{name}"')
    return _row(r)


def list_all(conn: sqlite3.Connection, ns: str) -> list[Image]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM images WHERE namespace = ? ORDER BY name", (ns,)
    ).fetchall()
    return [_row(r) for r in rows]


def _write(conn: sqlite3.Connection, ns: str, img: Image) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO images(namespace, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            ns,
            img.name,
            img.target.media_type,
            img.target.digest,
            img.target.size,
            labelsmod.dumps(img.target.annotations),
            labelsmod.dumps(img.labels),
            img.created_at,
            img.updated_at,
        ),
    )


def create(conn: sqlite3.Connection, ns: str, image: Image) -> Image:
    validate(image)
    namespaces.ensure(conn, ns)
    if conn.execute(
        "SELECT 1 FROM images WHERE namespace = ? AND name = ?", (ns, image.name)
    ).fetchone():
        raise AlreadyExists(f'image "{image.name}"')
    now = namespaces.now_ns()
    created = replace(image, created_at=now, updated_at=now)
    _write(conn, ns, created)
    return created


def update(conn: sqlite3.Connection, ns: str, image: Image, paths: Sequence[str]) -> Image:
    if not image.name:
        raise InvalidArgument("image name is required for update")
    current = get(conn, ns, image.name)
    if paths:
        new = replace(
            current,
            labels=dict(current.labels),
            target=replace(current.target, annotations=dict(current.target.annotations)),
        )
        for path in paths:
            if path.startswith("labels."):
                key = path[len("labels.") :]
                value = image.labels.get(key, "")
                new.labels[key] = value
            elif path.startswith("annotations."):
                key = path[len("annotations.") :]
                new.target.annotations[key] = image.target.annotations.get(key, "")
            elif path == "labels":
                new.labels = dict(image.labels)
            elif path == "target":
                new.target = replace(image.target, annotations=dict(image.target.annotations))
            elif path == "annotations":
                new.target.annotations = dict(image.target.annotations)
            else:
                raise InvalidArgument(f'cannot update "{path}" field on image "{image.name}"')
    else:
        new = replace(image)
    validate(new)
    new.created_at = current.created_at
    new.updated_at = namespaces.now_ns()
    _write(conn, ns, new)
    return new


def delete(conn: sqlite3.Connection, ns: str, name: str) -> None:
    cur = conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (ns, name))
    if cur.rowcount == 0:
        raise NotFound(f'image "{name}"')
