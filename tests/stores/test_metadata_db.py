"""MetadataDB's readers: ``read_sync`` on worker threads, beside the database thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
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
