"""``ContentWriter``: one open ingest of the namespaced content store.

It applies the Write protocol's rules to the backend writer (offset checks, restart at
offset 0), keeps a *shared* ingest — one whose expected blob another namespace already
committed — free of bytes until some arrive, and hands commits back to the store, which
records the blob in the namespace. Every blocking step is one ``asyncio.to_thread`` hop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pycontainerd.content.store import Status, validate_digest
from pycontainerd.errdefs import AlreadyExists, FailedPrecondition, OutOfRange

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Mapping
    from pathlib import Path

    from pycontainerd.content.local import LocalStore, LocalWriter
    from pycontainerd.content.metadata import NamespacedContentStore

__all__ = ["ContentWriter"]


class ContentWriter:
    """One open ingest in one namespace. Use from one task; always ``await close()``."""

    def __init__(
        self,
        store: NamespacedContentStore,
        namespace: str,
        ref: str,
        bref: str,
        backend: LocalWriter | None,
        shared: Status | None,
    ) -> None:
        self._store = store
        self.namespace = namespace
        self.ref = ref
        self._bref = bref
        self._w = backend
        # Set while the writer relies on a blob another namespace committed.
        self._shared = shared
        self._done = False

    def status(self) -> Status:
        if self._w is not None:
            st = self._w.status()
            return Status(
                ref=self.ref,
                offset=st.offset,
                total=st.total,
                started_at=st.started_at,
                updated_at=st.updated_at,
            )
        assert self._shared is not None
        return self._shared

    def digest(self) -> str:
        """The digest of what was written so far (the shared blob's for a shared ingest)."""
        if self._w is not None:
            return self._w.digest()
        assert self._shared is not None
        return self._shared.expected

    async def write_at(self, offset: int, data: bytes | memoryview) -> Status:
        """Apply one WRITE of the Write protocol; returns the new status.

        ``offset`` > 0 must equal the current offset (OutOfRange otherwise); ``offset`` 0
        while data exists restarts the ingest from scratch.
        """
        if self._done:
            raise FailedPrecondition(f"writer {self.ref!r} is closed")
        if self._w is None:
            await self._unshare(offset, data)
        current = self.status().offset
        if offset > 0 and offset != current:
            raise OutOfRange(f"write @{offset} must occur at current offset {current}")
        if data or (offset == 0 and current > 0):
            assert self._w is not None
            await asyncio.to_thread(_write_at, self._w, offset, data)
        return self.status()

    @property
    def data_path(self) -> Path | None:
        """The file the ingest's bytes go to (None for a shared ingest)."""
        return self._w.data_path if self._w is not None else None

    @property
    def fresh(self) -> bool:
        """An ingest of its own with no bytes yet."""
        return self._w is not None and not self._done and self._w.offset == 0

    def append_sync(self, data: bytes | memoryview) -> None:
        """Append ``data`` from a worker thread, hashing and writing it there; for a
        ``fresh`` writer all of whose bytes go through here. Blocking."""
        if self._w is None or self._done:
            raise FailedPrecondition(f"writer {self.ref!r} cannot append")
        self._w.write(data)

    async def _unshare(self, offset: int, data: bytes | memoryview) -> None:
        # A shared ingest becomes a real one only when bytes arrive: copy the shared blob
        # first if they continue it, start empty if they restart it.
        assert self._shared is not None
        shared = self._shared
        if not data and offset != 0:
            return
        if offset > 0 and offset != shared.offset:
            raise OutOfRange(f"write @{offset} must occur at current offset {shared.offset}")
        w = await self._store._open_backend(self._bref, 0)
        if offset > 0:
            try:
                await asyncio.to_thread(_copy_blob, self._store.backend, shared.expected, w)
            except BaseException:
                await asyncio.to_thread(w.close)
                raise
        self._w, self._shared = w, None

        def _unmark(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE ingests SET expected='' WHERE namespace=? AND ref=?",
                (self.namespace, self.ref),
            )

        await self._store.db.update(_unmark)

    async def commit(
        self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None
    ) -> str:
        """Commit the ingest as a blob of this namespace with ``labels``; returns its digest.

        FailedPrecondition on a size (``size`` > 0) or digest mismatch — the data stays
        for a resume; AlreadyExists when this namespace already has the blob.
        """
        if self._done:
            raise FailedPrecondition("cannot commit on closed writer")
        if expected:
            validate_digest(expected)
        self._done = True
        return await self._store._commit(self, size, expected, labels or {})

    def _commit_backend(self, size: int, expected: str) -> tuple[str, int]:
        """Blocking half of commit: verify and move the bytes into place."""
        if self._w is None:
            assert self._shared is not None
            shared = self._shared
            if size and size != shared.offset:
                raise FailedPrecondition(
                    f"{self.ref!r} failed size validation: {shared.offset} != {size}"
                )
            if expected and expected != shared.expected:
                raise FailedPrecondition(f"{self.ref!r} unexpected digest")
            # The blob must still be there: a Delete elsewhere may have removed it.
            info = self._store.backend.info(shared.expected)
            return shared.expected, info.size
        w = self._w
        offset = w.offset
        if size and size != offset:
            w.close()
            raise FailedPrecondition(f"{self.ref!r} failed size validation: {offset} != {size}")
        try:
            return w.commit(offset, expected), offset
        except AlreadyExists:
            # Another ingest committed the same bytes first: the blob is there all the same.
            return w.digest(), offset

    async def close(self) -> None:
        """Release the ref, keeping the data for a resume (a no-op after commit)."""
        self._done = True
        if self._w is not None:
            # LocalWriter.close is idempotent; the object stays for status(). A cancelled
            # stream's handler is cancelled again while it cleans up: shielded, the close
            # still runs (unshielded, the executor job could be dropped before it starts and
            # the ref would stay locked until a restart).
            fut = asyncio.get_running_loop().run_in_executor(None, self._w.close)
            await asyncio.shield(fut)


def _write_at(w: LocalWriter, offset: int, data: bytes | memoryview) -> None:
    # One thread hop per protocol message: truncate if asked, then hash the bytes and hand
    # them to the writer's disk thread (the client sends the next message meanwhile).
    if offset == 0 and w.offset > 0:
        w.truncate(0)
    if data:
        w.write_pipelined(data)


def _copy_blob(backend: LocalStore, digest: str, w: LocalWriter) -> None:
    with backend.open_reader(digest) as r:
        pos = 0
        while pos < r.size:
            chunk = r.read_at(pos, 1 << 20)
            if not chunk:
                break
            w.write(chunk)
            pos += len(chunk)
