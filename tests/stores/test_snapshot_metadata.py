"""The namespaced snapshot layer over real backends, a real metadata database and leases."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pycontainerd import namespaces
from pycontainerd.api.events import snapshot_pb2
from pycontainerd.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.services.leases import LeaseService
from pycontainerd.snapshots.local import SMALL_SNAPSHOT
from pycontainerd.snapshots.metadata import NamespacedSnapshotter, SnapshotService
from pycontainerd.snapshots.native import NativeSnapshotter
from pycontainerd.snapshots.overlay import OverlaySnapshotter, check_supported
from pycontainerd.snapshots.snapshotter import Info, Kind

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from google.protobuf.message import Message


class Recorder:
    """A publisher that remembers what it was given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Message, str | None]] = []

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        self.events.append((topic, event, namespace))


class Env:
    def __init__(
        self, db: MetadataDB, backend: NativeSnapshotter, svc: SnapshotService, rec: Recorder
    ) -> None:
        self.db = db
        self.backend = backend
        self.svc = svc
        self.rec = rec
        self.sn: NamespacedSnapshotter = svc.get("native")


def use(ns: str | None, lease: str | None = None) -> None:
    namespaces.current_namespace.set(ns)
    namespaces.current_lease.set(lease)


# Where the backend keeps its snapshot table: a file of its own, or (as in the daemon) a
# table of the metadata database that shares its transactions.
STORES = ["file", "shared"]


@pytest.fixture(params=STORES)
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    db = MetadataDB(tmp_path / "meta.db")
    await db.open()
    shared = db if request.param == "shared" else None
    backend = await asyncio.to_thread(
        NativeSnapshotter, tmp_path / "native", db=shared, table="native_snapshots"
    )
    rec = Recorder()
    svc = SnapshotService(db, {"native": backend}, rec)
    use("default")
    yield Env(db, backend, svc, rec)
    await svc.close()
    await backend.close()
    await db.close()


async def test_service_selects_snapshotter(env: Env) -> None:
    assert env.svc.names == ["native"]
    with pytest.raises(InvalidArgument):
        env.svc.get("")
    with pytest.raises(InvalidArgument):
        env.svc.get("zfs")


async def test_namespace_required(env: Env) -> None:
    use(None)
    with pytest.raises(FailedPrecondition):
        await env.sn.prepare("k")
    with pytest.raises(FailedPrecondition):
        await env.sn.walk()


async def test_namespaces_are_isolated(env: Env) -> None:
    sn = env.sn
    use("ns1")
    await sn.prepare("k", labels={"who": "ns1"})
    await sn.commit("base", "k")
    use("ns2")
    with pytest.raises(NotFound):
        await sn.stat("base")
    with pytest.raises(NotFound):  # ns1's parent is invisible here
        await sn.prepare("x", "base")
    await sn.prepare("k", labels={"who": "ns2"})
    assert [i.name for i in await sn.walk()] == ["k"]
    assert dict((await sn.stat("k")).labels) == {"who": "ns2"}
    use("ns1")
    assert [(i.name, i.kind) for i in await sn.walk()] == [("base", Kind.COMMITTED)]
    # Both live in one backend under distinct, namespace-prefixed keys.
    backend_keys = sorted(i.name for i in await env.backend.walk())
    assert len(backend_keys) == 2
    assert backend_keys[0].startswith("ns1/") and backend_keys[0].endswith("/base")
    assert backend_keys[1].startswith("ns2/") and backend_keys[1].endswith("/k")
    # Writes create their namespace implicitly, as containerd's do.
    names = await env.db.view(lambda c: [r[0] for r in c.execute("SELECT name FROM namespaces")])
    assert sorted(names) == ["ns1", "ns2"]


async def test_codes(env: Env) -> None:
    sn = env.sn
    await sn.prepare("a", labels={"containerd.io/snapshot/keep": "yes", "other": "x"})
    with pytest.raises(AlreadyExists):
        await sn.prepare("a")
    with pytest.raises(AlreadyExists):
        await sn.view("a")
    with pytest.raises(NotFound):
        await sn.prepare("b", "missing")
    with pytest.raises(InvalidArgument):
        await sn.prepare("b", "a")
    with pytest.raises(InvalidArgument):
        await sn.prepare("")
    await sn.commit("A", "a")
    with pytest.raises(FailedPrecondition):
        await sn.mounts("A")
    with pytest.raises(FailedPrecondition):
        await sn.commit("B", "A")
    await sn.view("v", "A")
    with pytest.raises(FailedPrecondition):
        await sn.commit("B", "v")
    with pytest.raises(FailedPrecondition):
        await sn.remove("A")
    for op in (sn.stat, sn.usage, sn.mounts, sn.remove):
        with pytest.raises(NotFound):
            await op("unknown")
    with pytest.raises(NotFound):
        await sn.commit("X", "unknown")
    with pytest.raises(InvalidArgument):
        await sn.update(Info("A", Kind.COMMITTED, parent="z"), ["parent"])
    with pytest.raises(InvalidArgument):
        await sn.prepare("big", labels={"k": "v" * 5000})
    # Only inherited labels reach the backend.
    (binfo,) = [i for i in await env.backend.walk() if i.name.endswith("/A")]
    assert dict(binfo.labels) == {}
    (bactive,) = [i for i in await env.backend.walk() if i.kind == Kind.VIEW]
    assert bactive.parent == binfo.name


async def test_commit_to_existing_name_keeps_active(env: Env) -> None:
    sn = env.sn
    await sn.prepare("a")
    await sn.commit("A", "a")
    mounts = await sn.prepare("b")
    with pytest.raises(AlreadyExists):
        await sn.commit("A", "b")
    assert (await sn.stat("b")).kind == Kind.ACTIVE
    assert await sn.mounts("b") == mounts
    backend_kinds = sorted(i.kind for i in await env.backend.walk())
    assert backend_kinds == [Kind.ACTIVE, Kind.COMMITTED]


async def test_concurrent_unpack_of_same_chain(env: Env) -> None:
    sn = env.sn
    await sn.prepare("base-x")
    await sn.commit("sha256:base", "base-x")
    await asyncio.gather(
        sn.prepare("extract-1", "sha256:base"), sn.prepare("extract-2", "sha256:base")
    )
    results = await asyncio.gather(
        sn.commit("sha256:top", "extract-1"),
        sn.commit("sha256:top", "extract-2"),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert sum(isinstance(r, AlreadyExists) for r in results) == 1
    loser = "extract-2" if results[0] is None else "extract-1"
    assert (await sn.stat(loser)).kind == Kind.ACTIVE
    assert len(await sn.mounts(loser)) == 1
    await sn.remove(loser)
    await sn.flush_removals()
    assert (await sn.stat("sha256:top")).parent == "sha256:base"
    assert len(await env.backend.walk()) == 2


async def test_concurrent_prepare_same_key(env: Env) -> None:
    results = await asyncio.gather(env.sn.prepare("k"), env.sn.prepare("k"), return_exceptions=True)
    assert sum(isinstance(r, AlreadyExists) for r in results) == 1
    assert len(await env.backend.walk()) == 1


async def test_remove_removes_backend(env: Env) -> None:
    sn = env.sn
    await sn.prepare("a")
    await sn.commit("A", "a")
    await sn.prepare("b", "A")
    await sn.remove("b")
    await sn.remove("A")
    await sn.flush_removals()  # backend snapshots go in the background, in order
    assert await env.backend.walk() == []
    await asyncio.to_thread(env.backend.flush_removals)
    assert list(env.backend.snapshots_dir.iterdir()) == []


async def test_leases(env: Env) -> None:
    sn = env.sn
    leases = LeaseService(env.db)
    await leases.create("l1", {})
    use("default", "nope")
    with pytest.raises(NotFound):
        await sn.prepare("a")
    assert await env.backend.walk() == []  # nothing created for an unknown lease

    async def resources() -> list[tuple[str, str, str]]:
        return await env.db.view(
            lambda c: c.execute(
                "SELECT lease, type, id FROM lease_resources ORDER BY id"
            ).fetchall()
        )

    use("default", "l1")
    await sn.prepare("a")
    assert await resources() == [("l1", "snapshots/native", "a")]
    await sn.commit("A", "a")
    assert await resources() == [("l1", "snapshots/native", "A")]
    use("default")
    await sn.view("v", "A")  # no lease: not recorded
    assert await resources() == [("l1", "snapshots/native", "A")]
    await sn.remove("v")
    await sn.remove("A")
    assert await resources() == []


async def test_events(env: Env) -> None:
    sn = env.sn
    use("evns")
    await sn.prepare("a")
    await sn.commit("A", "a")
    await sn.view("v", "A")
    with pytest.raises(AlreadyExists):
        await sn.prepare("v")
    await sn.remove("v")
    await sn.remove("A")
    assert env.rec.events == [
        ("/snapshot/prepare", snapshot_pb2.SnapshotPrepare(key="a"), "evns"),
        ("/snapshot/commit", snapshot_pb2.SnapshotCommit(key="a", name="A"), "evns"),
        ("/snapshot/remove", snapshot_pb2.SnapshotRemove(key="v"), "evns"),
        ("/snapshot/remove", snapshot_pb2.SnapshotRemove(key="A"), "evns"),
    ]


async def test_update_usage_walk(env: Env) -> None:
    sn = env.sn
    await sn.prepare("a", labels={"x": "1"})
    before = await sn.stat("a")
    info = await sn.update(Info("a", Kind.ACTIVE, labels={"y": "2"}), ["labels.y"])
    assert dict(info.labels) == {"x": "1", "y": "2"}
    assert info.created_at == before.created_at
    info = await sn.update(Info("a", Kind.ACTIVE, labels={"containerd.io/snapshot/z": "3"}))
    assert dict(info.labels) == {"containerd.io/snapshot/z": "3"}
    assert dict((await sn.stat("a")).labels) == dict(info.labels)
    (binfo,) = await env.backend.walk()
    assert dict(binfo.labels) == {"containerd.io/snapshot/z": "3"}
    usage = await sn.usage("a")
    assert usage.inodes == 1
    await sn.commit("A", "a", labels={"team": "red"})
    await sn.prepare("b", "A")
    assert {i.name for i in await sn.walk(["parent==A"])} == {"b"}
    assert {i.name for i in await sn.walk(["labels.team==red"])} == {"A"}
    assert {i.name for i in await sn.walk(["kind==active"])} == {"b"}
    with pytest.raises(InvalidArgument):
        await sn.walk(["labels.=="])


@pytest.fixture(params=STORES)
async def overlay(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[NamespacedSnapshotter, OverlaySnapshotter]]:
    """The namespaced layer over a real overlayfs backend (skips where overlay is refused)."""
    try:
        check_supported(tmp_path / "probe")
    except OSError as exc:
        pytest.skip(f"overlayfs not usable here: {exc}")
    db = MetadataDB(tmp_path / "meta.db")
    await db.open()
    shared = db if request.param == "shared" else None
    backend = await asyncio.to_thread(
        OverlaySnapshotter, tmp_path / "overlay", db=shared, table="overlayfs_snapshots"
    )
    try:
        use("default")
        yield SnapshotService(db, {"overlayfs": backend}).get("overlayfs"), backend
    finally:
        await backend.close()
        await db.close()


@pytest.mark.root
async def test_overlay_mount_shapes_through_layer(
    overlay: tuple[NamespacedSnapshotter, OverlaySnapshotter],
) -> None:
    sn, backend = overlay
    (m,) = await sn.prepare("a")
    assert (m.type, m.options) == ("bind", ("rw", "rbind"))
    await sn.commit("A", "a")
    (m,) = await sn.prepare("b", "A")
    assert m.type == "overlay" and m.source == "overlay"
    assert [o.split("=")[0] for o in m.options] == [
        *(["index"] if backend.index_off else []),
        "workdir",
        "upperdir",
        "lowerdir",
    ]
    await sn.commit("B", "b")
    (m,) = await sn.view("v1", "A")
    assert (m.type, m.options) == ("bind", ("ro", "rbind"))
    (m,) = await sn.view("v2", "B")
    assert m.type == "overlay"
    assert [o for o in m.options if o.startswith(("upperdir", "workdir"))] == []
    assert len(next(o for o in m.options if o.startswith("lowerdir=")).split(":")) == 2


@pytest.mark.root
async def test_overlay_commit_small_and_big_through_layer(
    overlay: tuple[NamespacedSnapshotter, OverlaySnapshotter],
) -> None:
    """On overlayfs a small snapshot commits in the database thread's transaction and a
    big one (more than SMALL_SNAPSHOT entries) through the worker path: both recorded,
    with their usage, and the active keys gone."""
    sn, _ = overlay
    for key, files in (("small", 2), ("big", SMALL_SNAPSHOT + 5)):
        (m,) = await sn.prepare(key)
        root = Path(m.source)  # a parentless snapshot is a bind mount of its dir

        def fill(root: Path = root, files: int = files) -> None:
            for i in range(files):
                (root / f"f{i}").write_text("x")

        await asyncio.to_thread(fill)
        await sn.commit(key.upper(), key)
        assert (await sn.stat(key.upper())).kind == Kind.COMMITTED
        with pytest.raises(NotFound):
            await sn.stat(key)
        assert (await sn.usage(key.upper())).inodes == files + 1


async def test_prune_removes_unreferenced_backend_snapshots(env: Env) -> None:
    sn = env.sn
    await sn.prepare("a")
    await sn.commit("A", "a")
    await sn.prepare("b", "A")
    await sn.commit("B", "b")
    await sn.prepare("keep", "A")
    # A crash between backend work and the metadata transaction leaves backend orphans:
    (a_backend,) = [i.name for i in await env.backend.walk() if i.name.endswith("/A")]
    await env.backend.prepare("default/1/crashed", a_backend)
    # ... and GC deletes metadata rows without touching the backend.
    await env.db.update(lambda c: c.execute("DELETE FROM snapshots WHERE key IN ('B')"))
    removed = await sn.prune()
    assert sorted(k.rsplit("/", 1)[1] for k in removed) == ["B", "crashed"]
    left = {i.name.rsplit("/", 1)[1] for i in await env.backend.walk()}
    assert left == {"A", "keep"}  # A is still referenced, and a parent of "keep"
    assert (await sn.stat("keep")).parent == "A"
    assert len(list(env.backend.snapshots_dir.iterdir())) == 2
