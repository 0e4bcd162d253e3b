"""The namespaced content store: per-namespace visibility over one shared backend.

Blobs live once on disk (``LocalStore``); which namespace can see which blob is recorded
in the metadata database (table ``content``), as are in-progress ingests (``ingests``) and
what a lease protects (``lease_resources``). Every method reads the request's namespace
with ``namespace_required()`` and its lease with ``namespaces.lease()``.

Rules, as containerd's ``metadata/content.go`` with the default *shared* policy:

- a blob committed in namespace A is NotFound from namespace B;
- a writer in B whose expected digest is already on disk (and whose size is 0 or matches)
  starts at ``offset == size`` and can commit without sending a byte;
- the backend ingest of ref R in namespace N is ``"N/R"``, so equal refs in different
  namespaces never contend for the same lock;
- an ingest without a lease expires 24 h after it was last opened (GC drops it then); with
  a lease, the ingest and later the committed blob are lease resources. A lease header
  naming a lease that does not exist makes writes fail with NotFound.

Delete removes the namespace's record and publishes ``/content/delete``. Until the garbage
collector exists, Delete also removes the blob file once no namespace references it; GC
will take that over (see ``exclusive``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from pycontainerd import filters, labels, namespaces
from pycontainerd.api.events import content_pb2 as content_events
from pycontainerd.content.store import Info, Status, validate_digest
from pycontainerd.content.writer import ContentWriter
from pycontainerd.errdefs import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from pycontainerd.events import topics

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import AsyncIterator, Mapping, Sequence

    from pycontainerd.content.local import BlobReader, LocalStore, LocalWriter
    from pycontainerd.events import Publisher
    from pycontainerd.metadata.db import MetadataDB

__all__ = ["ContentWriter", "NamespacedContentStore"]

log = logging.getLogger(__name__)

INGEST_EXPIRY_NS = 24 * 3600 * 1_000_000_000
# containerd retries a locked ref 10 times with random sleeps of up to 2^i ms (~1 s total).
_LOCK_ATTEMPTS = 10


def _row_info(digest: str, row: tuple[int, str, int, int]) -> Info:
    size, label_text, created, updated = row
    return Info(
        digest=digest,
        size=size,
        created_at=created,
        updated_at=updated,
        labels=labels.loads(label_text),
    )


def _require_lease(conn: sqlite3.Connection, ns: str, lease: str) -> None:
    row = conn.execute("SELECT 1 FROM leases WHERE namespace=? AND id=?", (ns, lease)).fetchone()
    if row is None:
        raise NotFound(f"lease {lease!r}: lease does not exist")


def _add_resource(
    conn: sqlite3.Connection, ns: str, lease: str | None, kind: str, rid: str
) -> None:
    if lease is None:
        return
    _require_lease(conn, ns, lease)
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?,?,?,?)",
        (ns, lease, kind, rid),
    )


def _remove_resource(
    conn: sqlite3.Connection, ns: str, lease: str | None, kind: str, rid: str
) -> None:
    if lease is None:
        return
    conn.execute(
        "DELETE FROM lease_resources WHERE namespace=? AND lease=? AND type=? AND id=?",
        (ns, lease, kind, rid),
    )


class _Gate:
    """Shared/exclusive gate: commits share it, blob removal (Delete, GC) excludes them.

    It closes the window where a commit in one namespace relies on a blob file another
    namespace's Delete is about to unlink.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _close_abandoned(fut: asyncio.Future[LocalWriter]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    asyncio.get_running_loop().run_in_executor(None, fut.result().close)


# Blobs up to SMALL_BLOB bytes are cached in memory, SMALL_CACHE_BYTES in all.
SMALL_BLOB = 256 << 10
SMALL_CACHE_BYTES = 32 << 20
INFO_CACHE_ENTRIES = 8192


class NamespacedContentStore:
    """The content store as services see it: namespaced, leased, publishing events."""

    def __init__(
        self, backend: LocalStore, db: MetadataDB, publisher: Publisher | None = None
    ) -> None:
        self.backend = backend
        self._small: OrderedDict[str, bytes] = OrderedDict()
        self._small_bytes = 0
        # (namespace, digest) → Info: every change of a content row goes through this
        # store or the garbage collector (which calls forget_infos), so entries stay true.
        # Clients ask Info before every Read; this spares a database hop each time.
        self._infos: OrderedDict[tuple[str, str], Info] = OrderedDict()
        self.db = db
        self.publisher = publisher
        self._gate = _Gate()

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold off every commit (for whoever removes blob files: Delete, GC)."""
        return self._gate.exclusive()

    # --- committed content -----------------------------------------------------------

    def forget_infos(self) -> None:
        """Drop the cached Info records (after rows changed behind this store's back)."""
        self._infos.clear()

    def _remember(self, ns: str, info: Info) -> Info:
        self._infos[(ns, info.digest)] = info
        if len(self._infos) > INFO_CACHE_ENTRIES:
            self._infos.popitem(last=False)
        return dataclasses.replace(info, labels=dict(info.labels))

    async def info(self, digest: str) -> Info:
        """The blob as this namespace sees it; InvalidArgument, NotFound."""
        validate_digest(digest)
        ns = namespaces.namespace_required()
        cached = self._infos.get((ns, digest))
        if cached is not None:
            self._infos.move_to_end((ns, digest))
            return dataclasses.replace(cached, labels=dict(cached.labels))

        def _get(conn: sqlite3.Connection) -> Info:
            row = conn.execute(
                "SELECT size, labels, created_at, updated_at FROM content"
                " WHERE namespace=? AND digest=?",
                (ns, digest),
            ).fetchone()
            if row is None:
                raise NotFound(f"content digest {digest}")
            return _row_info(digest, row)

        return self._remember(ns, await self.db.view(_get))

    async def exists(self, digest: str) -> bool:
        try:
            await self.info(digest)
        except NotFound:
            return False
        return True

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change labels (``labels`` or ``labels.<key>`` paths; none = replace all labels).

        InvalidArgument for another path or an oversized label; NotFound.
        """
        validate_digest(info.digest)
        ns = namespaces.namespace_required()
        what = f"content info {info.digest!r}"

        def _update(conn: sqlite3.Connection) -> Info:
            row = conn.execute(
                "SELECT size, labels, created_at, updated_at FROM content"
                " WHERE namespace=? AND digest=?",
                (ns, info.digest),
            ).fetchone()
            if row is None:
                raise NotFound(f"content digest {info.digest}")
            current = _row_info(info.digest, row)
            if fieldpaths:
                new = labels.apply_paths(current.labels, info.labels, fieldpaths, what)
                new_labels = current.labels if new is None else new
            else:
                new_labels = labels.validate({k: v for k, v in info.labels.items() if v})
            now = time.time_ns()
            conn.execute(
                "UPDATE content SET labels=?, updated_at=? WHERE namespace=? AND digest=?",
                (labels.dumps(new_labels), now, ns, info.digest),
            )
            return Info(
                digest=info.digest,
                size=current.size,
                created_at=current.created_at,
                updated_at=now,
                labels=new_labels,
            )

        self._infos.pop((ns, info.digest), None)
        return self._remember(ns, await self.db.update(_update))

    async def list_content(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        """Blobs of this namespace matching containerd filters (digest, size, labels.<k>)."""
        flt = filters.parse(list(filter_strings))
        ns = namespaces.namespace_required()

        def _list(conn: sqlite3.Connection) -> list[Info]:
            rows = conn.execute(
                "SELECT digest, size, labels, created_at, updated_at FROM content"
                " WHERE namespace=? ORDER BY digest",
                (ns,),
            ).fetchall()
            return [_row_info(r[0], r[1:]) for r in rows]

        infos = await self.db.view(_list)
        return [
            i
            for i in infos
            if flt.match(
                filters.field_adaptor({"digest": i.digest, "size": str(i.size), "labels": i.labels})
            )
        ]

    async def delete(self, digest: str) -> None:
        """Remove the blob from this namespace; NotFound if it is not there.

        The file goes too once no namespace references it (GC will take this over).
        """
        validate_digest(digest)
        ns = namespaces.namespace_required()
        lease = namespaces.lease()

        def _delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM content WHERE namespace=? AND digest=?", (ns, digest))
            if cur.rowcount == 0:
                raise NotFound(f"content digest {digest}")
            _remove_resource(conn, ns, lease, "content", digest)
            return (
                conn.execute("SELECT 1 FROM content WHERE digest=? LIMIT 1", (digest,)).fetchone()
                is None
            )

        self._infos.pop((ns, digest), None)
        async with self._gate.exclusive():
            orphan = await self.db.update(_delete)
            # Again: a read that started before the delete may have cached the old row.
            self._infos.pop((ns, digest), None)
            if orphan:
                with contextlib.suppress(NotFound):
                    await asyncio.to_thread(self.backend.delete, digest)
        if self.publisher is not None:
            self.publisher.publish(
                topics.CONTENT_DELETE, content_events.ContentDelete(digest=digest), ns
            )

    async def open_reader(self, digest: str) -> BlobReader:
        """Open a blob this namespace can see; the caller closes it. NotFound otherwise."""
        await self.info(digest)
        return await asyncio.to_thread(self.backend.open_reader, digest)

    async def read_small(self, digest: str, size: int) -> bytes:
        """A small blob's bytes, from memory when read before (blobs never change).

        The caller has checked visibility (``info``). Manifests, configs and indexes are
        read again and again by clients (ctr reads each one several times per ``run``):
        serving them from memory saves the thread hops of opening and reading the file.
        """
        data = self._small.get(digest)
        if data is not None:
            self._small.move_to_end(digest)
            return data
        data = await asyncio.to_thread(self.backend.read_all, digest)
        if len(data) == size:
            self._small[digest] = data
            self._small_bytes += len(data)
            while self._small_bytes > SMALL_CACHE_BYTES:
                _, old = self._small.popitem(last=False)
                self._small_bytes -= len(old)
        return data

    async def read_all(self, digest: str) -> bytes:
        """A whole (small) blob this namespace can see."""
        await self.info(digest)
        return await asyncio.to_thread(self.backend.read_all, digest)

    # --- ingests -----------------------------------------------------------------------

    async def status(self, ref: str) -> Status:
        """Progress of this namespace's ingest ``ref``; NotFound when there is none."""
        ns = namespaces.namespace_required()

        def _get(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT expected FROM ingests WHERE namespace=? AND ref=?", (ns, ref)
            ).fetchone()
            return None if row is None else str(row[0])

        expected = await self.db.view(_get)
        if expected is None:
            raise NotFound(f"reference {ref}")
        return await asyncio.to_thread(self._backend_status, ns, ref, expected)

    def _backend_status(self, ns: str, ref: str, expected: str) -> Status:
        try:
            st = self.backend.status(f"{ns}/{ref}")
        except NotFound:
            if not expected:
                raise
            # A shared ingest has no bytes of its own: it is complete from the start.
            info = self.backend.info(expected)
            return Status(
                ref=ref,
                offset=info.size,
                total=info.size,
                started_at=info.created_at,
                updated_at=info.created_at,
                expected=expected,
            )
        return Status(
            ref=ref,
            offset=st.offset,
            total=st.total,
            started_at=st.started_at,
            updated_at=st.updated_at,
            expected=expected,
        )

    async def list_statuses(self, filter_strings: Sequence[str] = ()) -> list[Status]:
        """This namespace's ingests whose ``ref`` matches the filters."""
        flt = filters.parse(list(filter_strings))
        ns = namespaces.namespace_required()

        def _list(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT ref, expected FROM ingests WHERE namespace=? ORDER BY ref", (ns,)
            ).fetchall()
            return [(str(r[0]), str(r[1])) for r in rows]

        def _statuses(rows: list[tuple[str, str]]) -> list[Status]:
            out = []
            for ref, expected in rows:
                with contextlib.suppress(NotFound):
                    out.append(self._backend_status(ns, ref, expected))
            return out

        rows = [
            r for r in await self.db.view(_list) if flt.match(filters.field_adaptor({"ref": r[0]}))
        ]
        return await asyncio.to_thread(_statuses, rows)

    async def abort(self, ref: str) -> None:
        """Drop this namespace's ingest ``ref`` and its data; NotFound when there is none."""
        ns = namespaces.namespace_required()
        lease = namespaces.lease()

        def _drop(conn: sqlite3.Connection) -> str:
            row = conn.execute(
                "SELECT expected FROM ingests WHERE namespace=? AND ref=?", (ns, ref)
            ).fetchone()
            if row is None:
                raise NotFound(f"reference {ref}")
            conn.execute("DELETE FROM ingests WHERE namespace=? AND ref=?", (ns, ref))
            _remove_resource(conn, ns, lease, "ingests", ref)
            return str(row[0])

        await self.db.update(_drop)
        # Shared or not, drop any bytes the backend holds under this namespace's key.
        with contextlib.suppress(NotFound):
            await asyncio.to_thread(self.backend.abort, f"{ns}/{ref}")

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> ContentWriter:
        """Begin or resume the ingest ``ref`` in this namespace; the caller must close it.

        Raises InvalidArgument (empty ref, bad digest), AlreadyExists (``expected`` is
        already committed in this namespace), NotFound (the request's lease does not
        exist), Unavailable (another writer holds the ref for about a second).
        """
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if expected:
            validate_digest(expected)
        ns = namespaces.namespace_required()
        lease = namespaces.lease()
        backend = self.backend

        def _begin(conn: sqlite3.Connection) -> tuple[bool, int | None]:
            if expected:
                row = conn.execute(
                    "SELECT 1 FROM content WHERE namespace=? AND digest=?", (ns, expected)
                ).fetchone()
                if row is not None:
                    # Keep it from being collected while the caller's lease lasts.
                    _add_resource(conn, ns, lease, "content", expected)
                    return True, None
            shared_size: int | None = None
            if expected:
                with contextlib.suppress(NotFound):
                    size = backend.info(expected).size
                    if total in (0, size):
                        shared_size = size
            now = time.time_ns()
            expires = 0 if lease is not None else now + INGEST_EXPIRY_NS
            _add_resource(conn, ns, lease, "ingests", ref)
            conn.execute(
                "INSERT INTO ingests(namespace, ref, expected, expires_at, created_at)"
                " VALUES (?,?,?,?,?) ON CONFLICT(namespace, ref) DO UPDATE SET"
                " expected=excluded.expected, expires_at=excluded.expires_at",
                (ns, ref, expected if shared_size is not None else "", expires, now),
            )
            return False, shared_size

        exists, shared_size = await self.db.update(_begin)
        if exists:
            raise AlreadyExists(f"content {expected}")
        bref = f"{ns}/{ref}"
        if shared_size is not None:
            shared = Status(
                ref=ref,
                offset=shared_size,
                total=shared_size,
                started_at=time.time_ns(),
                updated_at=time.time_ns(),
                expected=expected,
            )
            return ContentWriter(self, ns, ref, bref, None, shared)
        w = await self._open_backend(bref, total)
        return ContentWriter(self, ns, ref, bref, w, None)

    async def _open_backend(self, bref: str, total: int) -> LocalWriter:
        loop = asyncio.get_running_loop()
        for attempt in range(_LOCK_ATTEMPTS):
            fut = loop.run_in_executor(None, self.backend.writer, bref, total)
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                # The open may still succeed in its thread: release what nobody will use.
                fut.add_done_callback(_close_abandoned)
                raise
            except Unavailable:
                if attempt == _LOCK_ATTEMPTS - 1:
                    raise
            await asyncio.sleep(random.random() * (1 << attempt) / 1000)
        raise AssertionError("unreachable")

    async def _commit(
        self, writer: ContentWriter, size: int, expected: str, new_labels: Mapping[str, str]
    ) -> str:
        ns, ref = writer.namespace, writer.ref
        lease = namespaces.lease()
        checked = labels.validate({k: v for k, v in new_labels.items() if v})
        async with self._gate.shared():
            dgst, size = await asyncio.to_thread(writer._commit_backend, size, expected)

            def _record(conn: sqlite3.Connection) -> bool:
                now = time.time_ns()
                cur = conn.execute(
                    "INSERT OR IGNORE INTO content(namespace, digest, size, labels, created_at,"
                    " updated_at) VALUES (?,?,?,?,?,?)",
                    (ns, dgst, size, labels.dumps(checked), now, now),
                )
                conn.execute("DELETE FROM ingests WHERE namespace=? AND ref=?", (ns, ref))
                _remove_resource(conn, ns, lease, "ingests", ref)
                _add_resource(conn, ns, lease, "content", dgst)
                return cur.rowcount == 0

            already = await self.db.update(_record)
            self._infos.pop((ns, dgst), None)
        if already:
            raise AlreadyExists(f"content {dgst}")
        return dgst
