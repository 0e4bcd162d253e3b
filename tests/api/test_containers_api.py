"""containerd.services.containers.v1.Containers over a real grpc.aio server and the stubs.

The plugins are loaded through their registrations (exchange, metadata, the containers
service and its gRPC service), as the daemon loads them; requests are shaped like the
ones ``ctr container create`` sends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, field_mask_pb2, timestamp_pb2

from pycontainerd.api.events import container_pb2 as container_events
from pycontainerd.api.services.containers.v1 import containers_pb2 as pb
from pycontainerd.api.services.containers.v1 import containers_pb2_grpc
from pycontainerd.config import Config
from pycontainerd.events.exchange import Exchange
from pycontainerd.grpc.containers import ContainersServicer
from pycontainerd.plugin import PluginSet, PluginType, Registry
from pycontainerd.plugins import containers, core, events
from pycontainerd.server.plugins import close_plugins, load_plugins

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    Serve = Callable[..., Awaitable[grpc.aio.Channel]]
    Stub = containers_pb2_grpc.ContainersAsyncStub

NS = (("containerd-namespace", "default"),)
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
SPEC_JSON = (
    b'{"ociVersion":"1.0.2-dev","process":{"args":["sh"],"cwd":"/"},"root":{"path":"rootfs"}}'
)
GO_ZERO = timestamp_pb2.Timestamp(seconds=-62135596800)


def ctr_container(
    cid: str = "c1",
    *,
    labels: dict[str, str] | None = None,
    snapshotter: str = "overlayfs",
    extensions: dict[str, any_pb2.Any] | None = None,
) -> pb.Container:
    """A container as ctr 1.6 sends it to Containers/Create."""
    return pb.Container(
        id=cid,
        labels={"io.containerd.image.config.stop-signal": "SIGTERM"} if labels is None else labels,
        image="x",
        runtime=pb.Container.Runtime(
            name="io.containerd.runc.v2",
            options=any_pb2.Any(type_url="containerd.runc.v1.Options", value=b""),
        ),
        spec=any_pb2.Any(type_url=SPEC_URL, value=SPEC_JSON),
        snapshotter=snapshotter,
        snapshot_key=cid,
        created_at=GO_ZERO,
        updated_at=GO_ZERO,
        extensions=extensions,
    )


@pytest.fixture
async def plugins(tmp_path: Path) -> AsyncIterator[PluginSet]:
    registry = Registry([events.exchange, core.metadata, containers.service, containers.containers])
    cfg = Config(root=str(tmp_path / "root"), state=str(tmp_path / "state"))
    ps = await load_plugins(registry, cfg, address="", ttrpc_address="")
    yield ps
    await close_plugins(ps)


@pytest.fixture
async def stub(plugins: PluginSet, serve: Serve) -> Stub:
    p = plugins.get(PluginType.GRPC, "containers")
    assert p is not None and p.ok, p and p.error
    assert isinstance(p.instance, ContainersServicer)
    return containers_pb2_grpc.ContainersStub(await serve(p.instance))


@pytest.fixture
def exchange(plugins: PluginSet) -> Exchange:
    p = plugins.get(PluginType.EVENT, "exchange")
    assert p is not None and isinstance(p.instance, Exchange)
    return p.instance


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


async def test_create_as_ctr_sends_it_round_trips(stub: Stub) -> None:
    sent = ctr_container()
    resp = await stub.Create(pb.CreateContainerRequest(container=sent), metadata=NS)
    got = resp.container
    # The daemon fills the times; the Go zero time the client sent is ignored.
    assert got.created_at.seconds > 0 and got.created_at == got.updated_at
    for c in (got, (await stub.Get(pb.GetContainerRequest(id="c1"), metadata=NS)).container):
        assert c.spec.type_url == SPEC_URL and c.spec.value == SPEC_JSON
        assert c.runtime.name == "io.containerd.runc.v2"
        assert c.runtime.HasField("options")
        assert c.runtime.options.type_url == "containerd.runc.v1.Options"
        assert c.runtime.options.value == b""
        assert dict(c.labels) == {"io.containerd.image.config.stop-signal": "SIGTERM"}
        assert (c.id, c.image, c.snapshotter, c.snapshot_key) == ("c1", "x", "overlayfs", "c1")
        assert c.created_at == got.created_at


async def test_extensions_round_trip(stub: Stub) -> None:
    ext = any_pb2.Any(type_url="example.com/Ext", value=b"\x00\xffbinary")
    await stub.Create(
        pb.CreateContainerRequest(container=ctr_container(extensions={"e1": ext})), metadata=NS
    )
    got = (await stub.Get(pb.GetContainerRequest(id="c1"), metadata=NS)).container
    assert dict(got.extensions) == {"e1": ext}


async def test_create_errors(stub: Stub) -> None:
    def create(c: pb.Container) -> Awaitable[object]:
        return stub.Create(pb.CreateContainerRequest(container=c), metadata=NS)

    no_spec = ctr_container()
    no_spec.ClearField("spec")
    no_runtime = ctr_container()
    no_runtime.ClearField("runtime")
    no_snapshotter = ctr_container(snapshotter="")
    for bad in (ctr_container("bad id"), ctr_container(""), no_spec, no_runtime, no_snapshotter):
        assert await code_of(create(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    await create(ctr_container())
    assert await code_of(create(ctr_container())) == grpc.StatusCode.ALREADY_EXISTS
    no_ns = stub.Create(pb.CreateContainerRequest(container=ctr_container("c2")))
    assert await code_of(no_ns) == grpc.StatusCode.FAILED_PRECONDITION


async def test_list_and_list_stream(stub: Stub) -> None:
    for cid, role in (("web1", "web"), ("web2", "web"), ("db1", "db")):
        await stub.Create(
            pb.CreateContainerRequest(container=ctr_container(cid, labels={"role": role})),
            metadata=NS,
        )
    other_ns = (("containerd-namespace", "other"),)
    await stub.Create(pb.CreateContainerRequest(container=ctr_container("web3")), metadata=other_ns)

    listed = await stub.List(pb.ListContainersRequest(), metadata=NS)
    assert [c.id for c in listed.containers] == ["db1", "web1", "web2"]
    msgs = [m async for m in stub.ListStream(pb.ListContainersRequest(), metadata=NS)]
    assert [m.container.id for m in msgs] == ["db1", "web1", "web2"]
    assert all(m.container.spec.value == SPEC_JSON for m in msgs)

    flt = pb.ListContainersRequest(filters=["labels.role==web,id!=web2", "id==db1"])
    assert [c.id for c in (await stub.List(flt, metadata=NS)).containers] == ["db1", "web1"]
    stream = stub.ListStream(flt, metadata=NS)
    assert [m.container.id async for m in stream] == ["db1", "web1"]
    empty = stub.ListStream(pb.ListContainersRequest(), metadata=(("containerd-namespace", "e"),))
    assert [m async for m in empty] == []

    bad = pb.ListContainersRequest(filters=["id=="])
    assert await code_of(stub.List(bad, metadata=NS)) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [m async for m in stub.ListStream(bad, metadata=NS)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_update(stub: Stub) -> None:
    await stub.Create(pb.CreateContainerRequest(container=ctr_container()), metadata=NS)
    # What `ctr container label c1 a=b` sends.
    req = pb.UpdateContainerRequest(
        container=pb.Container(id="c1", labels={"a": "b"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.a"]),
    )
    got = (await stub.Update(req, metadata=NS)).container
    assert dict(got.labels) == {"io.containerd.image.config.stop-signal": "SIGTERM", "a": "b"}
    assert got.spec.value == SPEC_JSON and got.runtime.options.type_url
    assert got.updated_at.ToNanoseconds() >= got.created_at.ToNanoseconds()

    new_spec = any_pb2.Any(type_url=SPEC_URL, value=b'{"ociVersion":"1.1.0"}')
    req = pb.UpdateContainerRequest(
        container=pb.Container(id="c1", spec=new_spec, image="y"),
        update_mask=field_mask_pb2.FieldMask(paths=["spec", "image"]),
    )
    await stub.Update(req, metadata=NS)
    got = (await stub.Get(pb.GetContainerRequest(id="c1"), metadata=NS)).container
    assert got.spec == new_spec and got.image == "y" and "a" in got.labels

    # A full replace (no mask) with the same runtime and snapshotter is allowed.
    full = ctr_container(labels={"only": "this"})
    await stub.Update(pb.UpdateContainerRequest(container=full), metadata=NS)
    got = (await stub.Get(pb.GetContainerRequest(id="c1"), metadata=NS)).container
    assert dict(got.labels) == {"only": "this"} and got.image == "x"


async def test_update_errors(stub: Stub) -> None:
    await stub.Create(pb.CreateContainerRequest(container=ctr_container()), metadata=NS)

    def update(c: pb.Container, *paths: str) -> Awaitable[object]:
        mask = field_mask_pb2.FieldMask(paths=list(paths))
        return stub.Update(pb.UpdateContainerRequest(container=c, update_mask=mask), metadata=NS)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(update(pb.Container(), "labels")) == invalid
    assert await code_of(update(ctr_container(), "runtime")) == invalid
    assert await code_of(update(ctr_container(), "snapshotter")) == invalid
    assert await code_of(update(ctr_container(snapshotter="native"))) == invalid
    other_runtime = ctr_container()
    other_runtime.runtime.name = "io.containerd.kata.v2"
    assert await code_of(update(other_runtime)) == invalid
    assert await code_of(update(pb.Container(id="c1"), "spec")) == invalid
    missing = update(ctr_container("nope"), "labels")
    assert await code_of(missing) == grpc.StatusCode.NOT_FOUND
    got = (await stub.Get(pb.GetContainerRequest(id="c1"), metadata=NS)).container
    assert got.snapshotter == "overlayfs" and got.runtime.name == "io.containerd.runc.v2"


async def test_delete(stub: Stub) -> None:
    await stub.Create(pb.CreateContainerRequest(container=ctr_container()), metadata=NS)
    await stub.Delete(pb.DeleteContainerRequest(id="c1"), metadata=NS)
    get = stub.Get(pb.GetContainerRequest(id="c1"), metadata=NS)
    assert await code_of(get) == grpc.StatusCode.NOT_FOUND
    again = stub.Delete(pb.DeleteContainerRequest(id="c1"), metadata=NS)
    assert await code_of(again) == grpc.StatusCode.NOT_FOUND


async def test_events_carry_the_container(stub: Stub, exchange: Exchange) -> None:
    ns = (("containerd-namespace", "evns"),)
    async with exchange.subscribe(['topic~="^/containers/"']) as sub:
        await stub.Create(pb.CreateContainerRequest(container=ctr_container()), metadata=ns)
        await stub.Update(
            pb.UpdateContainerRequest(
                container=pb.Container(id="c1", labels={"k": "v"}),
                update_mask=field_mask_pb2.FieldMask(paths=["labels.k"]),
            ),
            metadata=ns,
        )
        await stub.Delete(pb.DeleteContainerRequest(id="c1"), metadata=ns)
        envs = [await anext(sub) for _ in range(3)]
    assert [e.topic for e in envs] == [
        "/containers/create",
        "/containers/update",
        "/containers/delete",
    ]
    assert {e.namespace for e in envs} == {"evns"}
    assert [e.event.type_url for e in envs] == [
        "containerd.events.ContainerCreate",
        "containerd.events.ContainerUpdate",
        "containerd.events.ContainerDelete",
    ]
    create = container_events.ContainerCreate.FromString(envs[0].event.value)
    assert create.id == "c1" and create.image == "x"
    assert create.runtime.name == "io.containerd.runc.v2"
    assert create.runtime.options.type_url == "containerd.runc.v1.Options"
    update = container_events.ContainerUpdate.FromString(envs[1].event.value)
    assert update.labels["k"] == "v" and update.snapshot_key == "c1"
    assert container_events.ContainerDelete.FromString(envs[2].event.value).id == "c1"
