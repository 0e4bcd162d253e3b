"""A backend snapshotter whose table lives in the metadata database (SharedStore): its
writes join the namespaced layer's transaction, its old metadata.db moves in, and a root
it does not describe gets its snapshots back. Real sqlite, real directories."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

import pytest

from pycontainerd.errdefs import FailedPrecondition
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.snapshots.native import NativeSnapshotter
from pycontainerd.snapshots.snapshotter import Kind

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

TABLE = "native_snapshots"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MetadataDB]:
    d = MetadataDB(tmp_path / "meta.db")
    await d.open()
    yield d
    await d.close()


async def shared(db: MetadataDB, root: Path) -> NativeSnapshotter:
    return await asyncio.to_thread(NativeSnapshotter, root, db=db, table=TABLE)


def dirs(sn: NativeSnapshotter) -> set[str]:
    return set(os.listdir(sn.snapshots_dir))


async def test_work_undone_with_the_transaction_it_joined(db: MetadataDB, tmp_path: Path) -> None:
    """Create, commit and remove made inside a metadata update that then fails leave
    no trace: rows as before, the new directory gone, the removed one still there."""
    sn = await shared(db, tmp_path / "native")
    try:
        await sn.prepare("a")
        await sn.commit("A", "a")
        await sn.prepare("b", "A")
        await asyncio.to_thread(sn.flush_removals)
        before = (await sn.walk(), dirs(sn))

        def fail_after(
            *steps: tuple[str, tuple[object, ...]],
        ) -> Callable[[sqlite3.Connection], None]:
            def txn(conn: sqlite3.Connection) -> None:
                for name, args in steps:
                    getattr(sn, name)(*args)
                raise ValueError("the namespaced record failed")

            return txn

        all_steps: list[tuple[tuple[str, tuple[object, ...]], ...]] = [
            (("create_sync", (Kind.ACTIVE, "c", "A", {})),),
            (("create_sync", (Kind.VIEW, "v", "A", {})),),
            (("commit_small_sync", ("B", "b", {})),),
            (("remove_sync", ("b",)),),
            (("remove_many_sync", (["b"],)),),
        ]
        for steps in all_steps:
            with pytest.raises(ValueError, match="namespaced record"):
                await db.update(fail_after(*steps))
            await asyncio.to_thread(sn.flush_removals)
            assert (await sn.walk(), dirs(sn)) == before, steps
        # The id the undone create had is handed out again, and works.
        await sn.prepare("c", "A")
        assert len(dirs(sn)) == len(before[1]) + 1
        # The same work in an update that commits stands, the directory going after it.
        await db.update(lambda conn: sn.remove_sync("c"))
        await asyncio.to_thread(sn.flush_removals)
        assert dirs(sn) == before[1]
    finally:
        await sn.close()


async def test_old_metadata_file_moves_into_the_table(db: MetadataDB, tmp_path: Path) -> None:
    root = tmp_path / "native"
    own = NativeSnapshotter(root)  # a snapshotter of a previous version: its own file
    await own.prepare("a")
    await own.commit("A", "a", {"containerd.io/snapshot/x": "1"})
    await own.prepare("b", "A")
    await own.prepare("gone")
    await own.remove("gone")  # the highest id handed out no longer names a row
    infos = await own.walk()
    await own.close()
    old_ids = {d for d in os.listdir(root / "snapshots") if d.isdigit()}

    sn = await shared(db, root)
    try:
        assert not (root / "metadata.db").exists()
        assert await sn.walk() == infos
        (m,) = await sn.mounts("b")
        assert m.source == str(sn.fs_path(max(old_ids, key=int)))
        # New ids continue above every id the old file ever handed out.
        await sn.prepare("c")
        new = dirs(sn) - old_ids
        assert len(new) == 1 and int(new.pop()) > 3
    finally:
        await sn.close()
    # Opening again moves nothing twice and loses nothing.
    again = await shared(db, root)
    try:
        assert sorted(i.name for i in await again.walk()) == ["A", "b", "c"]
    finally:
        await again.close()


async def test_another_root_gets_the_old_roots_snapshots_handed_back(
    db: MetadataDB, tmp_path: Path
) -> None:
    """The table describes one root. Opened at another (root_path changed), it writes the
    old root's rows back to that root's own file and starts empty; opened at the old
    root again, they come back."""
    first, second = tmp_path / "first", tmp_path / "second"
    sn = await shared(db, first)
    await sn.prepare("a")
    await sn.commit("A", "a")
    infos = await sn.walk()
    await sn.close()

    sn = await shared(db, second)
    try:
        assert await sn.walk() == []
        assert (first / "metadata.db").exists()
        await sn.prepare("elsewhere")
    finally:
        await sn.close()

    sn = await shared(db, first)
    try:
        assert await sn.walk() == infos
        with pytest.raises(FailedPrecondition):
            await sn.mounts("A")
    finally:
        await sn.close()
    assert (second / "metadata.db").exists()


async def test_a_crash_leftover_under_a_new_id_is_replaced(tmp_path: Path) -> None:
    """A crash after the rename but before the commit leaves snapshots/<id> behind, and
    that id is handed out again: creation clears it instead of failing."""
    sn = NativeSnapshotter(tmp_path / "native")  # its own file: ids start at 1
    try:
        stale = sn.snapshots_dir / "1" / "fs"
        stale.mkdir(parents=True)
        (stale / "junk").write_text("left by a crash")
        (m,) = await sn.prepare("a")
        assert m.source == str(sn.fs_path("1"))
        assert os.listdir(m.source) == []
    finally:
        await sn.close()
