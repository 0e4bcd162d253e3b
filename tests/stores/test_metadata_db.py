"""MetadataDB's readers: ``read_sync`` on worker threads, beside the database thread."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from pycontainerd.errdefs import FailedPrecondition
from pycontainerd.metadata.db import MetadataDB

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM namespaces").fetchone()[0])


def _add(name: str) -> Callable[[sqlite3.Connection], None]:
    def fn(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO namespaces (name, labels, created_at, updated_at) VALUES (?, '{}', 0, 0)",
            (name,),
        )

    return fn


async def test_read_sync_sees_commits_and_cannot_write(tmp_path: Path) -> None:
    db = MetadataDB(tmp_path / "meta.db")
    await db.open()
    try:
        before = await asyncio.to_thread(db.read_sync, _count)
        await db.update(_add("one"))
        # Committed on the database thread, visible to a worker's own connection at once.
        assert await asyncio.to_thread(db.read_sync, _count) == before + 1

        def write(conn: sqlite3.Connection) -> None:
            _add("two")(conn)

        with pytest.raises(sqlite3.OperationalError):  # query_only
            await asyncio.to_thread(db.read_sync, write)
        # Several threads read at once while the database thread writes.
        results: list[int] = []

        def reader() -> None:
            for _ in range(50):
                results.append(db.read_sync(_count))

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for i in range(20):
            await db.update(_add(f"ns{i}"))
        for t in threads:
            await asyncio.to_thread(t.join)
        assert len(results) == 200
        assert all(before + 1 <= n <= before + 21 for n in results)
        assert await asyncio.to_thread(db.read_sync, _count) == before + 21
    finally:
        await db.close()
    with pytest.raises(FailedPrecondition):
        await asyncio.to_thread(db.read_sync, _count)


async def test_write_sync_nests_in_the_update_in_progress(tmp_path: Path) -> None:
    """On the database thread inside an update, write_sync is a savepoint: its changes
    are undone alone when it raises and stand or fall with the whole update otherwise;
    read_sync there sees the update's own uncommitted changes."""
    db = MetadataDB(tmp_path / "meta.db")
    await db.open()
    try:
        before = await db.view(_count)

        def outer(conn: sqlite3.Connection) -> int:
            db.write_sync(_add("kept"))

            def undone(c: sqlite3.Connection) -> None:
                _add("undone")(c)
                raise KeyError("boom")

            with pytest.raises(KeyError):
                db.write_sync(undone)
            return db.read_sync(_count)

        assert await db.update(outer) == before + 1

        def failing(conn: sqlite3.Connection) -> None:
            db.write_sync(_add("lost"))
            raise ValueError("outer fails")

        with pytest.raises(ValueError, match="outer fails"):
            await db.update(failing)
        names = await db.view(lambda c: {r[0] for r in c.execute("SELECT name FROM namespaces")})
        assert "kept" in names and not {"undone", "lost"} & names
        # From another thread, write_sync is a transaction of its own.
        await asyncio.to_thread(db.write_sync, _add("own"))
        assert await db.view(_count) == before + 2
        # Outside an update the database thread refuses to write this way.
        with pytest.raises(RuntimeError):
            await db.view(lambda c: db.write_sync(_add("no")))
    finally:
        await db.close()


async def test_hooks_follow_how_the_update_ends(tmp_path: Path) -> None:
    db = MetadataDB(tmp_path / "meta.db")
    await db.open()
    seen: list[str] = []

    def failing_hook() -> None:
        raise KeyError("hook")

    try:

        def ok(conn: sqlite3.Connection) -> None:
            assert db.in_update()
            db.after_commit(lambda: seen.append("committed"))
            db.on_rollback(lambda: seen.append("never"))
            db.after_commit(failing_hook)  # logged; the others still run
            db.after_commit(lambda: seen.append("second"))
            assert seen == []  # not before the commit

        await db.update(ok)
        assert seen == ["committed", "second"]

        def bad(conn: sqlite3.Connection) -> None:
            db.after_commit(lambda: seen.append("never"))
            db.on_rollback(lambda: seen.append("rolled back"))
            raise ValueError("bad")

        with pytest.raises(ValueError, match="bad"):
            await db.update(bad)
        assert seen == ["committed", "second", "rolled back"]
        # Not in an update: no hooks to add to.
        assert not await asyncio.to_thread(db.in_update)
        with pytest.raises(RuntimeError):
            await db.view(lambda c: db.after_commit(lambda: None))
        with pytest.raises(RuntimeError):
            db.on_rollback(lambda: None)
    finally:
        await db.close()


async def test_update_sync_from_the_database_thread_is_refused(tmp_path: Path) -> None:
    """It would wait for itself forever."""
    db = MetadataDB(tmp_path / "meta.db")
    await db.open()
    try:
        with pytest.raises(RuntimeError, match="wait for itself"):
            await db.update(lambda c: db.update_sync(_count))
    finally:
        await db.close()


async def test_view_sync_reads_on_the_database_thread(tmp_path: Path) -> None:
    """From a worker thread it hops to the database thread and keeps no connection of its
    own (read_sync keeps one, three descriptors, per thread); inside an update it sees
    the update's own changes."""
    db = MetadataDB(tmp_path / "meta.db")
    await db.open()
    try:
        before = await db.view(_count)

        def from_threads() -> list[int]:
            return [db.view_sync(_count) for _ in range(3)]

        fds = len(os.listdir("/proc/self/fd"))
        with ThreadPoolExecutor(4) as pool:
            counts = [c for f in [pool.submit(from_threads) for _ in range(4)] for c in f.result()]
        assert counts == [before] * 12
        assert len(os.listdir("/proc/self/fd")) == fds
        # read_sync, for comparison, does keep a connection per thread.
        await asyncio.to_thread(db.read_sync, _count)
        assert len(os.listdir("/proc/self/fd")) > fds

        def inside(conn: sqlite3.Connection) -> int:
            _add("new")(conn)
            return db.view_sync(_count)

        assert await db.update(inside) == before + 1
    finally:
        await db.close()
