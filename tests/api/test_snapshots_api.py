"""containerd.services.snapshots.v1.Snapshots over a real grpc.aio server and the stubs.

The plugins are loaded through their registrations (exchange, metadata, both
snapshotters, the namespaced service and the gRPC service), as the daemon loads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2

from pycontainerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2_grpc
from pycontainerd.config import Config
from pycontainerd.grpc.snapshots import SnapshotsServicer
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import PluginSet, PluginType, Registry
from pycontainerd.plugins import core, events
from pycontainerd.plugins import snapshots as snapshot_plugins
from pycontainerd.server.plugins import close_plugins, load_plugins

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    Serve = Callable[..., Awaitable[grpc.aio.Channel]]

pytestmark = pytest.mark.root  # snapshot directories are chowned and mounted

NS = (("containerd-namespace", "default"),)


@pytest.fixture
async def plugins(tmp_path: Path) -> AsyncIterator[PluginSet]:
    registry = Registry(
        [
            events.exchange,
            core.metadata,
            snapshot_plugins.overlayfs,
            snapshot_plugins.native,
            snapshot_plugins.snapshots_service,
            snapshot_plugins.service,
        ]
    )
    cfg = Config(root=str(tmp_path / "root"), state=str(tmp_path / "state"))
    ps = await load_plugins(registry, cfg, address="", ttrpc_address="")
    yield ps
    await close_plugins(ps)


@pytest.fixture
async def stub(plugins: PluginSet, serve: Serve) -> snapshots_pb2_grpc.SnapshotsAsyncStub:
    p = plugins.get(PluginType.GRPC, "snapshots")
    assert p is not None and p.ok, p and p.error
    assert isinstance(p.instance, SnapshotsServicer)
    return snapshots_pb2_grpc.SnapshotsStub(await serve(p.instance))


def snapshotters(plugins: PluginSet) -> list[str]:
    return [p.registration.id for p in plugins.of_type(PluginType.SNAPSHOTTER) if p.ok]


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code()


async def test_plugins_load(plugins: PluginSet) -> None:
    native = plugins.get(PluginType.SNAPSHOTTER, "native")
    assert native is not None and native.ok
    overlay = plugins.get(PluginType.SNAPSHOTTER, "overlayfs")
    assert overlay is not None
    # overlayfs either works or is skipped with a reason; it never fails the daemon.
    assert overlay.ok or "skip plugin" in str(overlay.error)
    svc = plugins.get(PluginType.SERVICE, "snapshots-service")
    assert svc is not None and svc.ok
    assert svc.instance.names == sorted(snapshotters(plugins))


async def test_unpack_and_run_flow(stub: Any, plugins: PluginSet) -> None:
    for name in snapshotters(plugins):
        # ctr's unpack: Stat(chainID) NOT_FOUND -> Prepare(extract key) -> Commit(chainID).
        chain = f"sha256:{name}-base"
        assert (
            await code_of(
                stub.Stat(pb.StatSnapshotRequest(snapshotter=name, key=chain), metadata=NS)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        resp = await stub.Prepare(
            pb.PrepareSnapshotRequest(snapshotter=name, key=f"extract-1 {chain}"), metadata=NS
        )
        (m,) = resp.mounts
        assert (m.type, list(m.options)) == ("bind", ["rw", "rbind"])
        await stub.Commit(
            pb.CommitSnapshotRequest(snapshotter=name, name=chain, key=f"extract-1 {chain}"),
            metadata=NS,
        )
        info = (
            await stub.Stat(pb.StatSnapshotRequest(snapshotter=name, key=chain), metadata=NS)
        ).info
        assert (info.name, info.kind, info.parent) == (chain, pb.COMMITTED, "")
        assert info.created_at.seconds > 0

        # ctr run: Prepare(container id, parent chainID) -> Mounts.
        resp = await stub.Prepare(
            pb.PrepareSnapshotRequest(
                snapshotter=name, key=f"c-{name}", parent=chain, labels={"a": "b"}
            ),
            metadata=NS,
        )
        mounts = (
            await stub.Mounts(pb.MountsRequest(snapshotter=name, key=f"c-{name}"), metadata=NS)
        ).mounts
        assert list(mounts) == list(resp.mounts)
        if name == "overlayfs":
            (m,) = mounts
            assert (m.type, m.source) == ("overlay", "overlay")
            assert [o.split("=")[0] for o in m.options][-3:] == ["workdir", "upperdir", "lowerdir"]

        view = await stub.View(
            pb.ViewSnapshotRequest(snapshotter=name, key=f"v-{name}", parent=chain), metadata=NS
        )
        assert "ro" in view.mounts[0].options

        upd = await stub.Update(
            pb.UpdateSnapshotRequest(
                snapshotter=name,
                info=pb.Info(name=f"c-{name}", labels={"foo": "bar"}),
                update_mask=field_mask_pb2.FieldMask(paths=["labels.foo"]),
            ),
            metadata=NS,
        )
        assert dict(upd.info.labels) == {"a": "b", "foo": "bar"}
        assert upd.info.kind == pb.ACTIVE

        usage = await stub.Usage(pb.UsageRequest(snapshotter=name, key=f"c-{name}"), metadata=NS)
        assert usage.inodes == 1

        listed = [
            i.name
            async for r in stub.List(pb.ListSnapshotsRequest(snapshotter=name), metadata=NS)
            for i in r.info
        ]
        assert sorted(listed) == sorted([chain, f"c-{name}", f"v-{name}"])
        listed = [
            i.name
            async for r in stub.List(
                pb.ListSnapshotsRequest(snapshotter=name, filters=["kind==view"]), metadata=NS
            )
            for i in r.info
        ]
        assert listed == [f"v-{name}"]

        for key in (f"v-{name}", f"c-{name}", chain):
            await stub.Remove(pb.RemoveSnapshotRequest(snapshotter=name, key=key), metadata=NS)
        await stub.Cleanup(pb.CleanupRequest(snapshotter=name), metadata=NS)


async def test_error_codes(stub: Any) -> None:
    sn = "native"
    prep = pb.PrepareSnapshotRequest
    assert (
        await code_of(stub.Prepare(prep(key="k"), metadata=NS)) == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(stub.Prepare(prep(snapshotter="zfs", key="k"), metadata=NS))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(stub.Prepare(prep(snapshotter=sn, key="k")))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    await stub.Prepare(prep(snapshotter=sn, key="k"), metadata=NS)
    assert (
        await code_of(stub.Prepare(prep(snapshotter=sn, key="k"), metadata=NS))
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        await code_of(stub.Prepare(prep(snapshotter=sn, key="x", parent="nope"), metadata=NS))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        await code_of(stub.Prepare(prep(snapshotter=sn, key="x", parent="k"), metadata=NS))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    await stub.Commit(pb.CommitSnapshotRequest(snapshotter=sn, name="K", key="k"), metadata=NS)
    assert (
        await code_of(stub.Mounts(pb.MountsRequest(snapshotter=sn, key="K"), metadata=NS))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    await stub.Prepare(prep(snapshotter=sn, key="child", parent="K"), metadata=NS)
    assert (
        await code_of(stub.Remove(pb.RemoveSnapshotRequest(snapshotter=sn, key="K"), metadata=NS))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        await code_of(
            stub.Commit(
                pb.CommitSnapshotRequest(snapshotter=sn, name="K", key="child"), metadata=NS
            )
        )
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        await code_of(stub.Usage(pb.UsageRequest(snapshotter=sn, key="nope"), metadata=NS))
        == grpc.StatusCode.NOT_FOUND
    )
    bad_update = pb.UpdateSnapshotRequest(
        snapshotter=sn,
        info=pb.Info(name="K", parent="other"),
        update_mask=field_mask_pb2.FieldMask(paths=["parent"]),
    )
    assert await code_of(stub.Update(bad_update, metadata=NS)) == grpc.StatusCode.INVALID_ARGUMENT
    lease = (*NS, ("containerd-lease", "no-such-lease"))
    assert (
        await code_of(stub.Prepare(prep(snapshotter=sn, key="leased"), metadata=lease))
        == grpc.StatusCode.NOT_FOUND
    )
    bad_list = stub.List(pb.ListSnapshotsRequest(snapshotter=sn, filters=["kind=="]), metadata=NS)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in bad_list:
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_lease_header_records_snapshot(stub: Any, plugins: PluginSet) -> None:
    db = plugins.get(PluginType.METADATA, "bolt")
    assert db is not None and isinstance(db.instance, MetadataDB)
    await db.instance.update(
        lambda c: c.execute(
            "INSERT INTO leases (namespace, id, labels, created_at)"
            " VALUES ('default', 'L', '{}', 1)"
        )
    )
    md = (*NS, ("containerd-lease", "L"))
    await stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="native", key="k"), metadata=md)
    rows = await db.instance.view(
        lambda c: c.execute("SELECT lease, type, id FROM lease_resources").fetchall()
    )
    assert rows == [("L", "snapshots/native", "k")]


async def test_list_streams_in_batches(stub: Any) -> None:
    for i in range(250):
        await stub.Prepare(
            pb.PrepareSnapshotRequest(snapshotter="native", key=f"k{i:03d}"), metadata=NS
        )
    sizes = [
        len(r.info)
        async for r in stub.List(pb.ListSnapshotsRequest(snapshotter="native"), metadata=NS)
    ]
    assert sizes == [100, 100, 50]
