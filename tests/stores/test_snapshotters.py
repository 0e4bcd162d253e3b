"""Conformance suite for the backend snapshotters, run on both native and overlayfs.

Modelled on containerd's ``snapshots/testsuite``: real directories under tmp_path, real
sqlite, real mounts (root needed; overlayfs tests skip when the kernel refuses overlay).
File work inside mounts runs in worker threads, as the daemon would do it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pycontainerd.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.snapshots.local import SMALL_SNAPSHOT
from pycontainerd.snapshots.mount import Mount, compact_lowerdir, temp_mount
from pycontainerd.snapshots.native import NativeSnapshotter
from pycontainerd.snapshots.overlay import OverlaySnapshotter, check_supported
from pycontainerd.snapshots.snapshotter import Info, Kind, Snapshotter

if TYPE_CHECKING:
    from pycontainerd.snapshots.local import LocalSnapshotter

pytestmark = pytest.mark.root

Fn = Callable[[Path], object]


def _make(kind: str, root: Path, db: MetadataDB | None = None) -> LocalSnapshotter:
    cls = OverlaySnapshotter if kind == "overlayfs" else NativeSnapshotter
    if kind == "overlayfs":
        try:
            check_supported(root.parent / "overlay-probe")
        except OSError as exc:
            pytest.skip(f"overlayfs not usable here: {exc}")
    return cls(root, db=db, table=f"{kind}_snapshots")


# The metadata database each snapshotter under test keeps its table in (None: its own
# file), to open it again.
_DBS: weakref.WeakKeyDictionary[LocalSnapshotter, MetadataDB | None] = weakref.WeakKeyDictionary()


async def reopen(sn: LocalSnapshotter) -> LocalSnapshotter:
    db = _DBS[sn]
    table = f"{'overlayfs' if isinstance(sn, OverlaySnapshotter) else 'native'}_snapshots"
    return await asyncio.to_thread(type(sn), sn.root, db=db, table=table)


# Each backend with its snapshot table in a file of its own, and in a metadata database
# (as the daemon has it).
@pytest.fixture(
    params=[("native", "file"), ("overlayfs", "file"), ("native", "db"), ("overlayfs", "db")],
    ids="-".join,
)
async def sn(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LocalSnapshotter]:
    kind, store = request.param
    db: MetadataDB | None = None
    if store == "db":
        db = MetadataDB(tmp_path / "meta.db")
        await db.open()
    try:
        s = await asyncio.to_thread(_make, kind, tmp_path / kind, db)
        _DBS[s] = db
        yield s
        await s.close()
    finally:
        if db is not None:
            await db.close()


def _in_mount(mounts: list[Mount], fn: Fn) -> object:
    with temp_mount(mounts) as root:
        return fn(root)


async def in_mount(mounts: list[Mount], fn: Fn) -> object:
    return await asyncio.to_thread(_in_mount, mounts, fn)


async def layer(sn: Snapshotter, name: str, parent: str, fn: Fn) -> None:
    """Prepare on ``parent``, change the tree with ``fn``, commit as ``name``."""
    key = f"{name}-active"
    mounts = await sn.prepare(key, parent)
    await in_mount(mounts, fn)
    await sn.commit(name, key)


async def check_view(sn: Snapshotter, parent: str, fn: Fn) -> object:
    key = f"check-{parent}"
    mounts = await sn.view(key, parent)
    try:
        return await in_mount(mounts, fn)
    finally:
        await sn.remove(key)


def write(rel: str, data: str = "", mode: int = 0o644) -> Fn:
    def fn(root: Path) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(data)
        os.chmod(p, mode)

    return fn


def read_tree(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = ""
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_text()
    return out


async def test_basic(sn: LocalSnapshotter) -> None:
    def base(root: Path) -> None:
        (root / "foo").write_text("foo\n")
        (root / "a" / "b").mkdir(parents=True)
        (root / "a" / "b" / "c").write_text("c\n")

    await layer(sn, "committed", "", base)
    info = await sn.stat("committed")
    assert (info.name, info.kind, info.parent) == ("committed", Kind.COMMITTED, "")

    def change(root: Path) -> None:
        assert (root / "foo").read_text() == "foo\n"
        (root / "bar").write_text("bar\n")
        (root / "foo").unlink()

    await layer(sn, "next", "committed", change)
    assert (await sn.stat("next")).parent == "committed"
    tree = await check_view(sn, "next", read_tree)
    assert tree == {"a/": "", "a/b/": "", "a/b/c": "c\n", "bar": "bar\n"}
    names = {i.name for i in await sn.walk()}
    assert names == {"committed", "next"}


async def test_stat_active_and_committed(sn: LocalSnapshotter) -> None:
    await sn.prepare("active", labels={"l": "v"})
    info = await sn.stat("active")
    assert info == Info(
        name="active",
        kind=Kind.ACTIVE,
        labels={"l": "v"},
        created_at=info.created_at,
        updated_at=info.updated_at,
    )
    assert info.created_at > 0
    await sn.commit("done", "active", labels={"c": "1"})
    info = await sn.stat("done")
    assert (info.kind, dict(info.labels)) == (Kind.COMMITTED, {"c": "1"})
    with pytest.raises(NotFound):
        await sn.stat("active")


async def test_transitivity(sn: LocalSnapshotter) -> None:
    await layer(sn, "l1", "", write("f1", "one"))
    await layer(sn, "l2", "l1", write("f2", "two"))
    assert await check_view(sn, "l2", read_tree) == {"f1": "one", "f2": "two"}


async def test_prepare_view_failing(sn: LocalSnapshotter) -> None:
    await sn.prepare("a")
    with pytest.raises(AlreadyExists):
        await sn.prepare("a")
    with pytest.raises(AlreadyExists):
        await sn.view("a")
    with pytest.raises(NotFound):
        await sn.prepare("b", "missing")
    with pytest.raises(NotFound):
        await sn.view("b", "missing")
    with pytest.raises(InvalidArgument):  # parent is active, not committed
        await sn.prepare("b", "a")
    await sn.commit("A", "a")
    await sn.view("v", "A")
    with pytest.raises(InvalidArgument):  # parent is a view
        await sn.view("w", "v")
    # Nothing half-created is left behind by the failures.
    assert {i.name for i in await sn.walk()} == {"A", "v"}
    assert not [d for d in os.listdir(sn.snapshots_dir) if d.startswith("new-")]


async def test_update(sn: LocalSnapshotter) -> None:
    await sn.prepare("a", labels={"x": "1", "y": "2"})
    before = await sn.stat("a")
    got = await sn.update(Info(name="a", kind=Kind.ACTIVE, labels={"z": "3"}))
    assert dict(got.labels) == {"z": "3"}
    got = await sn.update(Info("a", Kind.ACTIVE, labels={"w": "4"}), ["labels.w"])
    assert dict(got.labels) == {"z": "3", "w": "4"}
    got = await sn.update(Info("a", Kind.ACTIVE, labels={}), ["labels.z"])
    assert dict(got.labels) == {"w": "4"}
    assert got.created_at == before.created_at
    assert got.updated_at >= before.updated_at
    assert dict((await sn.stat("a")).labels) == {"w": "4"}
    with pytest.raises(InvalidArgument):
        await sn.update(Info("a", Kind.COMMITTED, parent="x"), ["parent"])
    with pytest.raises(NotFound):
        await sn.update(Info("nope", Kind.ACTIVE, labels={"a": "b"}))


async def test_remove_and_codes(sn: LocalSnapshotter) -> None:
    await sn.prepare("a")
    with pytest.raises(AlreadyExists):
        await sn.commit("a", "a")
    await sn.commit("A", "a")
    with pytest.raises(FailedPrecondition):
        await sn.mounts("A")
    with pytest.raises(FailedPrecondition):
        await sn.commit("B", "A")  # committed is not active
    await sn.view("v", "A")
    with pytest.raises(FailedPrecondition):
        await sn.commit("B", "v")  # a view is not active
    await sn.prepare("b", "A")
    await sn.prepare("c")
    with pytest.raises(AlreadyExists):
        await sn.commit("A", "c")
    assert (await sn.stat("c")).kind == Kind.ACTIVE  # left intact
    with pytest.raises(FailedPrecondition):
        await sn.remove("A")
    for key in ("NotThere",):
        with pytest.raises(NotFound):
            await sn.remove(key)
        with pytest.raises(NotFound):
            await sn.usage(key)
        with pytest.raises(NotFound):
            await sn.mounts(key)
        with pytest.raises(NotFound):
            await sn.commit("X", key)
    await sn.remove("v")
    await sn.remove("b")
    await sn.remove("A")
    await sn.remove("c")
    assert await sn.walk() == []
    await asyncio.to_thread(sn.flush_removals)  # directories go in the background
    assert os.listdir(sn.snapshots_dir) == []


async def test_remove_many_in_one_transaction(sn: LocalSnapshotter) -> None:
    """A batch removes in order (children before their parent), reports the keys it could
    not remove and still removes the rest, files included."""
    await sn.prepare("a")
    await sn.commit("A", "a")
    await sn.prepare("b", "A")
    await sn.view("v", "A")
    await sn.prepare("keep", "A")
    failed = await asyncio.to_thread(sn.remove_many_sync, ["b", "missing", "v", "A"])
    assert [(k, type(e)) for k, e in failed] == [
        ("missing", NotFound),
        ("A", FailedPrecondition),  # "keep" is still its child
    ]
    assert {i.name for i in await sn.walk()} == {"A", "keep"}
    assert await asyncio.to_thread(sn.remove_many_sync, ["keep", "A"]) == []
    assert await sn.walk() == []
    await asyncio.to_thread(sn.flush_removals)
    assert os.listdir(sn.snapshots_dir) == []


async def test_walk_filters(sn: LocalSnapshotter) -> None:
    await sn.prepare("a", labels={"team": "red"})
    await sn.commit("A", "a", labels={"team": "blue", "containerd.io/x": "1"})
    await sn.prepare("b", "A", labels={"team": "red"})
    await sn.view("v", "A")

    async def names(*flt: str) -> set[str]:
        return {i.name for i in await sn.walk(flt)}

    assert await names() == {"A", "b", "v"}
    assert await names("kind==committed") == {"A"}
    assert await names("kind==active", "kind==view") == {"b", "v"}
    assert await names("labels.team==red") == {"b"}
    assert await names('labels."containerd.io/x"==1') == {"A"}
    assert await names("parent==A") == {"b", "v"}
    assert await names("parent==A,kind==view") == {"v"}
    assert await names("name~=^[ab]$") == {"b"}
    with pytest.raises(InvalidArgument):
        await sn.walk(["kind=="])


async def test_layer_file_update(sn: LocalSnapshotter) -> None:
    await layer(sn, "l1", "", write("file", "version one"))
    await layer(sn, "l2", "l1", write("file", "version two, longer"))
    await layer(sn, "l3", "l2", write("other", "x"))
    tree = await check_view(sn, "l3", read_tree)
    assert tree == {"file": "version two, longer", "other": "x"}


async def test_remove_directory_in_lower_layer(sn: LocalSnapshotter) -> None:
    def l1(root: Path) -> None:
        (root / "somedir" / "deep").mkdir(parents=True)
        (root / "somedir" / "f1").write_text("1")
        (root / "somedir" / "deep" / "f").write_text("d")

    def l2(root: Path) -> None:
        import shutil

        shutil.rmtree(root / "somedir")

    await layer(sn, "l1", "", l1)
    await layer(sn, "l2", "l1", l2)
    await layer(sn, "l3", "l2", write("somedir/f2", "2"))
    assert await check_view(sn, "l2", read_tree) == {}
    assert await check_view(sn, "l3", read_tree) == {"somedir/": "", "somedir/f2": "2"}


async def test_chown(sn: LocalSnapshotter) -> None:
    def l1(root: Path) -> None:
        (root / "dir").mkdir()
        (root / "dir" / "file").write_text("x")
        os.chown(root / "dir", 1000, 1001)
        os.chown(root / "dir" / "file", 1002, 1003)

    def l2(root: Path) -> None:
        os.chown(root / "dir" / "file", 2000, 2001)

    await layer(sn, "l1", "", l1)
    await layer(sn, "l2", "l1", l2)

    def owners(root: Path) -> tuple[tuple[int, int], tuple[int, int]]:
        d, f = os.stat(root / "dir"), os.stat(root / "dir" / "file")
        return (d.st_uid, d.st_gid), (f.st_uid, f.st_gid)

    assert await check_view(sn, "l1", owners) == ((1000, 1001), (1002, 1003))
    assert await check_view(sn, "l2", owners) == ((1000, 1001), (2000, 2001))


async def test_directory_permission_on_commit(sn: LocalSnapshotter) -> None:
    def l1(root: Path) -> None:
        (root / "dir1").mkdir()
        os.chmod(root / "dir1", 0o700)
        os.chown(root / "dir1", 1, 1)
        (root / "dir2").mkdir()
        os.chmod(root / "dir2", 0o711)

    def l2(root: Path) -> None:
        (root / "dir1" / "inner").write_text("x")  # copies dir1 up in overlay
        os.chmod(root / "dir2", 0o750)

    await layer(sn, "l1", "", l1)
    await layer(sn, "l2", "l1", l2)

    def modes(root: Path) -> tuple[int, int, int, int]:
        d1, d2 = os.stat(root / "dir1"), os.stat(root / "dir2")
        return stat.S_IMODE(d1.st_mode), d1.st_uid, d1.st_gid, stat.S_IMODE(d2.st_mode)

    assert await check_view(sn, "l2", modes) == (0o700, 1, 1, 0o750)


async def test_deleted_files_in_child(sn: LocalSnapshotter) -> None:
    def l1(root: Path) -> None:
        for n in ("keep", "gone", "alsogone"):
            (root / n).write_text(n)

    def l2(root: Path) -> None:
        (root / "gone").unlink()
        (root / "alsogone").unlink()

    await layer(sn, "l1", "", l1)
    await layer(sn, "l2", "l1", l2)
    assert await check_view(sn, "l2", read_tree) == {"keep": "keep"}


async def test_move_file_from_lower_layer(sn: LocalSnapshotter) -> None:
    def l1(root: Path) -> None:
        (root / "a").mkdir()
        (root / "b").mkdir()
        (root / "a" / "f").write_text("moved")

    def l2(root: Path) -> None:
        os.rename(root / "a" / "f", root / "b" / "f")

    await layer(sn, "l1", "", l1)
    await layer(sn, "l2", "l1", l2)
    tree = await check_view(sn, "l2", read_tree)
    assert tree == {"a/": "", "b/": "", "b/f": "moved"}


@pytest.mark.parametrize("parents", [0, 1, 2])
async def test_view_is_read_only(sn: LocalSnapshotter, parents: int) -> None:
    parent = ""
    for i in range(parents):
        await layer(sn, f"l{i}", parent, write(f"f{i}", "x"))
        parent = f"l{i}"
    mounts = await sn.view("v", parent)

    def try_write(root: Path) -> int:
        try:
            (root / "new").write_text("nope")
        except OSError as exc:
            return exc.errno or 0
        return 0

    assert await in_mount(mounts, try_write) == errno.EROFS


async def test_128_layers_mount(sn: LocalSnapshotter) -> None:
    parent = ""
    for i in range(128):
        await layer(sn, f"layer-{i}", parent, write(f"f{i:03d}", str(i)))
        parent = f"layer-{i}"
    mounts = await sn.prepare("top", parent)
    if isinstance(sn, OverlaySnapshotter):
        opts = mounts[0].options
        # Long enough that mounting needs the relative-lowerdir path.
        assert sum(len(o) for o in opts) > os.sysconf("SC_PAGESIZE")
        assert len(next(o for o in opts if o.startswith("lowerdir=")).split(":")) == 128

    def check(root: Path) -> list[str]:
        (root / "top-file").write_text("top")
        return sorted(os.listdir(root))

    cwd = os.getcwd()
    listing = await in_mount(mounts, check)
    assert os.getcwd() == cwd  # the relative-path mount kept its chdir to itself
    assert listing == sorted([f"f{i:03d}" for i in range(128)] + ["top-file"])


async def test_root_permission(sn: LocalSnapshotter) -> None:
    mounts = await sn.prepare("a")

    def mode(root: Path) -> int:
        return stat.S_IMODE(os.stat(root).st_mode)

    assert await in_mount(mounts, mode) == 0o755
    assert stat.S_IMODE(os.stat(sn.root).st_mode) == 0o700


async def test_usage(sn: LocalSnapshotter) -> None:
    mounts = await sn.prepare("a")
    empty = await sn.usage("a")
    assert empty.inodes == 1
    await in_mount(mounts, write("big", "x" * (1 << 20)))
    active = await sn.usage("a")
    assert active.inodes == 2
    assert active.size >= (1 << 20)
    await sn.commit("A", "a")
    assert await sn.usage("A") == active


async def test_commit_small_in_one_transaction_big_declined(sn: LocalSnapshotter) -> None:
    """commit_small_sync measures and commits a small snapshot itself and declines, with
    nothing changed, one of more than SMALL_SNAPSHOT entries (commit_sync measures it)."""

    def many(n: int) -> Fn:
        def fill(root: Path) -> None:
            for i in range(n):
                (root / f"f{i}").write_text("x")

        return fill

    small = await sn.prepare("small")
    await in_mount(small, many(3))
    assert await asyncio.to_thread(sn.commit_small_sync, "Small", "small", {})
    assert (await sn.stat("Small")).kind == Kind.COMMITTED
    assert (await sn.usage("Small")).inodes == 4
    big = await sn.prepare("big")
    await in_mount(big, many(SMALL_SNAPSHOT + 10))
    assert not await asyncio.to_thread(sn.commit_small_sync, "Big", "big", {})
    assert (await sn.stat("big")).kind == Kind.ACTIVE
    with pytest.raises(NotFound):
        await sn.stat("Big")
    await sn.commit("Big", "big")
    assert (await sn.usage("Big")).inodes == SMALL_SNAPSHOT + 11
    with pytest.raises(AlreadyExists):
        await asyncio.to_thread(sn.commit_small_sync, "Small", "other", {})


async def test_cleanup_removes_orphans(sn: LocalSnapshotter) -> None:
    await layer(sn, "l1", "", write("f", "x"))
    await sn.prepare("a", "l1")
    stray = sn.snapshots_dir / "9999"
    (stray / "fs").mkdir(parents=True)
    crashed = sn.snapshots_dir / "new-crashed"
    (crashed / "fs").mkdir(parents=True)
    before = set(os.listdir(sn.snapshots_dir))
    await sn.cleanup()
    after = set(os.listdir(sn.snapshots_dir))
    assert before - after == {"9999", "new-crashed"}
    assert len(after) == 2
    # The survivors still work.
    assert await in_mount(await sn.mounts("a"), read_tree) == {"f": "x"}


async def test_state_survives_reopen(sn: LocalSnapshotter) -> None:
    await layer(sn, "l1", "", write("f", "x"))
    await sn.prepare("a", "l1", labels={"k": "v"})
    await sn.close()
    again = await reopen(sn)
    try:
        assert dict((await again.stat("a")).labels) == {"k": "v"}
        assert await in_mount(await again.mounts("a"), read_tree) == {"f": "x"}
        await again.prepare("b", "l1")  # ids continue, no clash with existing dirs
        assert len(os.listdir(sn.snapshots_dir)) == 3
    finally:
        await again.close()
    # The fixture closes ``sn`` again: closing twice is harmless.


async def test_concurrent_prepares_get_distinct_snapshots(sn: LocalSnapshotter) -> None:
    await layer(sn, "base", "", write("f", "x"))
    results = await asyncio.gather(
        *(sn.prepare(f"k{i}", "base") for i in range(8)), return_exceptions=True
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    assert len({i.name for i in await sn.walk(["kind==active"])}) == 8
    dup = await asyncio.gather(sn.prepare("same"), sn.prepare("same"), return_exceptions=True)
    assert sum(isinstance(r, AlreadyExists) for r in dup) == 1


def test_compact_lowerdir() -> None:
    dirs = [f"/var/lib/x/snapshots/{i}/fs" for i in (12, 13, 7)]
    opts = ["index=off", "lowerdir=" + ":".join(dirs), "upperdir=/u"]
    chdir, out = compact_lowerdir(opts)
    assert chdir == "/var/lib/x/snapshots/"
    assert out == ["index=off", "upperdir=/u", "lowerdir=12/fs:13/fs:7/fs"]
    assert compact_lowerdir(["lowerdir=/a/fs"]) == ("", ["lowerdir=/a/fs"])
    assert compact_lowerdir(["lowerdir=/a:/b"]) == ("", ["lowerdir=/a:/b"])
