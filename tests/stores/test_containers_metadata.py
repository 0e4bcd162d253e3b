"""Container records over real sqlite: containerd's validation, update field paths,
opaque Any round trips, namespaces, leases, events and the GC request after delete."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from google.protobuf import any_pb2

from pycontainerd.api.events import container_pb2 as container_events
from pycontainerd.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from pycontainerd.metadata import namespaces
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.namespaces import current_lease, current_namespace
from pycontainerd.services.containers import AnyValue, Container, ContainerService, Runtime

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from google.protobuf.message import Message

SPEC = AnyValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b'{"ociVersion":"1"}')
OPTS = AnyValue("containerd.runc.v1.Options", b"")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Message, str | None]] = []

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        self.events.append((topic, event, namespace))


class GCCalls:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    async def __call__(self, sync: bool) -> None:
        self.calls.append(sync)


def use(ns: str | None, lease: str | None = None) -> None:
    current_namespace.set(ns)
    current_lease.set(lease)


def make(cid: str = "c1", **kw: object) -> Container:
    fields: dict[str, object] = {
        "runtime": Runtime("io.containerd.runc.v2", OPTS),
        "spec": SPEC,
        "snapshotter": "overlayfs",
        "snapshot_key": cid,
        "image": "docker.io/library/busybox:latest",
    }
    fields.update(kw)
    return Container(cid, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MetadataDB]:
    d = MetadataDB(tmp_path / "meta.db", synchronous="OFF")
    await d.open()
    yield d
    await d.close()


@pytest.fixture
def events() -> Recorder:
    return Recorder()


@pytest.fixture
def gc() -> GCCalls:
    return GCCalls()


@pytest.fixture
def svc(db: MetadataDB, events: Recorder, gc: GCCalls) -> ContainerService:
    s = ContainerService(db, events)
    s.set_gc(gc)
    use("default")
    return s


async def test_create_get_round_trips_every_field(svc: ContainerService) -> None:
    ext = {"ext.a": AnyValue("example.com/Ext", b"\x00\x01binary\xff")}
    created = await svc.create(make(labels={"a": "b"}, extensions=ext))
    assert created.created_at > 0 and created.created_at == created.updated_at
    got = await svc.get("c1")
    assert got == created
    assert got.spec == SPEC
    # A set-but-empty Any (ctr's runc options) stays set, with its type URL.
    assert got.runtime == Runtime("io.containerd.runc.v2", OPTS)
    assert got.extensions == ext
    assert got.labels == {"a": "b"}
    assert got.snapshotter == "overlayfs" and got.snapshot_key == "c1"
    assert got.sandbox == ""


async def test_unset_runtime_options_stay_unset(svc: ContainerService) -> None:
    await svc.create(make(runtime=Runtime("io.containerd.runc.v2", None)))
    assert (await svc.get("c1")).runtime.options is None


async def test_create_rejections(svc: ContainerService) -> None:
    for bad in (
        make(""),
        make("bad id!"),
        make("-leading"),
        make("x" * 77),
        make(runtime=Runtime("", OPTS)),
        make(spec=None),
        make(snapshotter=""),  # snapshot key without snapshotter
        make(labels={"k": "v" * 4096}),
        make(extensions={"": SPEC}),
    ):
        with pytest.raises(InvalidArgument):
            await svc.create(bad)
    assert await svc.list_containers([]) == []


async def test_create_without_snapshot_is_fine(svc: ContainerService) -> None:
    created = await svc.create(make(snapshotter="", snapshot_key=""))
    assert created.snapshot_key == ""


async def test_duplicate_and_unknown(svc: ContainerService, events: Recorder) -> None:
    await svc.create(make())
    with pytest.raises(AlreadyExists):
        await svc.create(make())
    with pytest.raises(NotFound):
        await svc.get("nope")
    with pytest.raises(NotFound):
        await svc.update(make("nope"), ["labels"])
    with pytest.raises(NotFound):
        await svc.delete("nope")
    # Failed operations publish nothing.
    assert [t for t, _, _ in events.events] == ["/containers/create"]


async def test_namespace_required_and_isolated(svc: ContainerService, db: MetadataDB) -> None:
    use(None)
    with pytest.raises(FailedPrecondition):
        await svc.create(make())
    use("bad ns!")
    with pytest.raises(InvalidArgument):
        await svc.get("c1")
    use("other")
    await svc.create(make())
    # The first write created the namespace.
    assert await db.view(lambda c: namespaces.get(c, "other")) is not None
    use("default")
    with pytest.raises(NotFound):
        await svc.get("c1")
    await svc.create(make())
    use("other")
    await svc.delete("c1")
    use("default")
    assert (await svc.get("c1")).id == "c1"


async def test_lease_does_not_capture_containers(svc: ContainerService, db: MetadataDB) -> None:
    use("default", lease="l1")
    await svc.create(make())
    rows = await db.view(lambda c: c.execute("SELECT * FROM lease_resources").fetchall())
    assert rows == []


async def test_empty_label_values_are_not_stored(svc: ContainerService) -> None:
    created = await svc.create(make(labels={"a": "b", "gone": ""}))
    assert created.labels == {"a": "b"}
    assert (await svc.get("c1")).labels == {"a": "b"}


async def test_update_label_paths(svc: ContainerService) -> None:
    first = await svc.create(make(labels={"a": "1", "b": "2"}))
    upd = await svc.update(Container("c1", labels={"c": "3", "a": "x"}), ["labels.c"])
    assert upd.labels == {"a": "1", "b": "2", "c": "3"}
    # A path whose key the request does not carry removes that label.
    upd = await svc.update(Container("c1"), ["labels.b"])
    assert upd.labels == {"a": "1", "c": "3"}
    upd = await svc.update(Container("c1", labels={"z": "9"}), ["labels"])
    assert upd.labels == {"z": "9"}
    # Nothing but the labels moved; created_at is kept, updated_at advances.
    got = await svc.get("c1")
    assert got.spec == SPEC and got.image == first.image and got.runtime == first.runtime
    assert got.created_at == first.created_at and got.updated_at >= first.updated_at


async def test_update_other_paths(svc: ContainerService) -> None:
    await svc.create(make(extensions={"keep": SPEC, "drop": OPTS}))
    new_spec = AnyValue(SPEC.type_url, b'{"ociVersion":"2"}')
    upd = await svc.update(
        Container("c1", spec=new_spec, image="other:1", snapshot_key="k2"),
        ["spec", "image", "snapshotkey"],
    )
    assert (upd.spec, upd.image, upd.snapshot_key) == (new_spec, "other:1", "k2")
    upd = await svc.update(
        Container("c1", extensions={"new": OPTS}), ["extensions.new", "extensions.drop"]
    )
    assert upd.extensions == {"keep": SPEC, "new": OPTS}
    upd = await svc.update(Container("c1", extensions={"only": SPEC}), ["extensions"])
    assert (await svc.get("c1")).extensions == {"only": SPEC}


async def test_update_rejections(svc: ContainerService) -> None:
    await svc.create(make())
    with pytest.raises(InvalidArgument):
        await svc.update(Container(""), ["labels"])
    for path in ("runtime", "snapshotter", "id", "created_at", "bogus"):
        with pytest.raises(InvalidArgument, match="cannot update"):
            await svc.update(make(), [path])
    # Clearing the spec through its path fails validation.
    with pytest.raises(InvalidArgument):
        await svc.update(Container("c1"), ["spec"])
    with pytest.raises(InvalidArgument):
        await svc.update(Container("c1", labels={"k": "v" * 5000}), ["labels.k"])
    assert (await svc.get("c1")).spec == SPEC


async def test_full_replace_checks_immutable_fields(svc: ContainerService) -> None:
    await svc.create(make(labels={"a": "b"}))
    with pytest.raises(InvalidArgument, match="Snapshotter field is immutable"):
        await svc.update(make(snapshotter="native"), [])
    with pytest.raises(InvalidArgument, match=r"Runtime\.Name field is immutable"):
        await svc.update(make(runtime=Runtime("io.other.v1")), [])
    # Same immutable fields: everything updatable is replaced, runtime options are kept.
    upd = await svc.update(
        make(labels={"x": "y"}, image="new:1", runtime=Runtime("io.containerd.runc.v2")), []
    )
    assert upd.labels == {"x": "y"} and upd.image == "new:1"
    assert upd.runtime.options == OPTS


async def test_list_filters(svc: ContainerService) -> None:
    await svc.create(make("a1", labels={"role": "web", "x.y": "z"}))
    await svc.create(make("a2", labels={"role": "db"}, image="postgres:16"))
    await svc.create(make("b1", runtime=Runtime("io.containerd.kata.v2")))

    async def ids(*flt: str) -> list[str]:
        return [c.id for c in await svc.list_containers(list(flt))]

    assert await ids() == ["a1", "a2", "b1"]
    assert await ids("id==a2") == ["a2"]
    assert await ids("labels.role==web") == ["a1"]
    assert await ids('labels."x.y"==z') == ["a1"]
    assert await ids("labels.role") == ["a1", "a2"]
    assert await ids("image==postgres:16") == ["a2"]
    assert await ids("runtime.name==io.containerd.kata.v2") == ["b1"]
    assert await ids("id~=^a", "runtime.name~=kata") == ["a1", "a2", "b1"]
    assert await ids("id~=^a,labels.role!=web") == ["a2"]
    with pytest.raises(InvalidArgument):
        await ids("id==")


async def test_events_and_gc(svc: ContainerService, events: Recorder, gc: GCCalls) -> None:
    await svc.create(make(labels={"a": "b"}))
    await svc.update(Container("c1", labels={"c": "d"}), ["labels.c"])
    assert gc.calls == []
    await svc.delete("c1")
    assert gc.calls == [False]
    topics = [t for t, _, _ in events.events]
    assert topics == ["/containers/create", "/containers/update", "/containers/delete"]
    create, update, delete = (e for _, e, _ in events.events)
    assert create == container_events.ContainerCreate(
        id="c1",
        image="docker.io/library/busybox:latest",
        runtime=container_events.ContainerCreate.Runtime(
            name="io.containerd.runc.v2",
            options=any_pb2.Any(type_url=OPTS.type_url, value=OPTS.value),
        ),
    )
    assert isinstance(create, container_events.ContainerCreate)
    assert create.runtime.HasField("options")
    assert update == container_events.ContainerUpdate(
        id="c1",
        image="docker.io/library/busybox:latest",
        labels={"a": "b", "c": "d"},
        snapshot_key="c1",
    )
    assert delete == container_events.ContainerDelete(id="c1")
    with pytest.raises(NotFound):
        await svc.get("c1")


async def test_records_survive_reopen(tmp_path: Path) -> None:
    use("default")
    d = MetadataDB(tmp_path / "m.db", synchronous="OFF")
    await d.open()
    created = await ContainerService(d, Recorder()).create(make(extensions={"e": SPEC}))
    await d.close()
    d = MetadataDB(tmp_path / "m.db", synchronous="OFF")
    await d.open()
    try:
        assert await ContainerService(d, Recorder()).get("c1") == created
    finally:
        await d.close()
