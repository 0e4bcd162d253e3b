"""The foundation's services through our generated stubs: codes for bad input, restart."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2

from pycontainerd.api.grpc.health.v1 import health_pb2, health_pb2_grpc
from pycontainerd.api.services.events.v1 import events_pb2, events_pb2_grpc
from pycontainerd.api.services.introspection.v1 import introspection_pb2, introspection_pb2_grpc
from pycontainerd.api.services.leases.v1 import leases_pb2, leases_pb2_grpc
from pycontainerd.api.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from pycontainerd.api.services.version.v1 import version_pb2_grpc
from tests.support.daemon import Daemon, metadata

NS = namespace_pb2


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code()


def test_namespace_codes(daemon: Daemon) -> None:
    with daemon.channel() as ch:
        stub = namespace_pb2_grpc.NamespacesStub(ch)
        md = metadata()
        for bad in ["bad name", "../x", "-a", "a..b", "x" * 77, "ünï"]:
            assert (
                code_of(
                    stub.Create,
                    NS.CreateNamespaceRequest(namespace=NS.Namespace(name=bad)),
                    metadata=md,
                )
                == grpc.StatusCode.INVALID_ARGUMENT
            ), bad
        stub.Create(
            NS.CreateNamespaceRequest(namespace=NS.Namespace(name="apins", labels={"a": "1"})),
            metadata=md,
        )
        assert (
            code_of(
                stub.Create,
                NS.CreateNamespaceRequest(namespace=NS.Namespace(name="apins")),
                metadata=md,
            )
            == grpc.StatusCode.ALREADY_EXISTS
        )
        assert (
            code_of(stub.Delete, NS.DeleteNamespaceRequest(name="missing-ns"), metadata=md)
            == grpc.StatusCode.NOT_FOUND
        )
        # Get of a never-created namespace answers OK with no labels (a quirk ctr relies on).
        got = stub.Get(NS.GetNamespaceRequest(name="never-created"), metadata=md)
        assert got.namespace.name == "never-created" and not got.namespace.labels
        # Update: a mask path other than labels.* is rejected; labels.<k> sets one key.
        upd = NS.UpdateNamespaceRequest(
            namespace=NS.Namespace(name="apins", labels={"b": "2"}),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
        assert code_of(stub.Update, upd, metadata=md) == grpc.StatusCode.INVALID_ARGUMENT
        upd.update_mask.paths[:] = ["labels.b"]
        assert dict(stub.Update(upd, metadata=md).namespace.labels) == {"a": "1", "b": "2"}
        # No mask: the labels are replaced.
        upd.ClearField("update_mask")
        upd.namespace.labels.clear()
        upd.namespace.labels["c"] = "3"
        assert dict(stub.Update(upd, metadata=md).namespace.labels) == {"c": "3"}
        label = NS.UpdateNamespaceRequest(
            namespace=NS.Namespace(name="apins", labels={"k": "v" * 5000}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.k"]),
        )
        assert code_of(stub.Update, label, metadata=md) == grpc.StatusCode.INVALID_ARGUMENT


def test_namespace_header_rules(daemon: Daemon) -> None:
    with daemon.channel() as ch:
        leases = leases_pb2_grpc.LeasesStub(ch)
        assert code_of(leases.List, leases_pb2.ListRequest()) == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            code_of(leases.List, leases_pb2.ListRequest(), metadata=metadata(""))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        for bad in ["../x", "a b", "-a", "a..b", "x" * 77]:
            assert (
                code_of(leases.List, leases_pb2.ListRequest(), metadata=metadata(bad))
                == grpc.StatusCode.INVALID_ARGUMENT
            )
        # The ttrpc header on gRPC is ignored.
        assert (
            code_of(
                leases.List,
                leases_pb2.ListRequest(),
                metadata=(("containerd-namespace-ttrpc", "default"),),
            )
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        # Two values: the first one counts.
        leases.Create(
            leases_pb2.CreateRequest(id="first-wins"),
            metadata=(("containerd-namespace", "nsone"), ("containerd-namespace", "nstwo")),
        )
        ids = [
            x.id for x in leases.List(leases_pb2.ListRequest(), metadata=metadata("nsone")).leases
        ]
        assert "first-wins" in ids
        # Version, introspection and namespaces need no namespace.
        version_pb2_grpc.VersionStub(ch).Version(empty_pb2.Empty())
        introspection_pb2_grpc.IntrospectionStub(ch).Server(empty_pb2.Empty())
        namespace_pb2_grpc.NamespacesStub(ch).List(NS.ListNamespacesRequest())
    # No directory was made for a rejected namespace name.
    assert not any("a b" in str(p) for p in daemon.base.rglob("*"))


def test_lease_codes_and_resources(daemon: Daemon) -> None:
    with daemon.channel() as ch:
        stub = leases_pb2_grpc.LeasesStub(ch)
        md = metadata("leasecodes")
        created = stub.Create(leases_pb2.CreateRequest(labels={"x": "y"}), metadata=md).lease
        assert created.id and created.created_at.seconds > 0  # an empty id gets a generated one
        assert (
            code_of(stub.Create, leases_pb2.CreateRequest(id=created.id), metadata=md)
            == grpc.StatusCode.ALREADY_EXISTS
        )
        assert (
            code_of(stub.Delete, leases_pb2.DeleteRequest(id="unknown"), metadata=md)
            == grpc.StatusCode.NOT_FOUND
        )
        res = leases_pb2.Resource(id="sha256:" + "a" * 64, type="content")
        assert (
            code_of(
                stub.AddResource,
                leases_pb2.AddResourceRequest(id="unknown", resource=res),
                metadata=md,
            )
            == grpc.StatusCode.NOT_FOUND
        )
        stub.AddResource(leases_pb2.AddResourceRequest(id=created.id, resource=res), metadata=md)
        snap = leases_pb2.Resource(id="k1", type="snapshots/overlayfs")
        stub.AddResource(leases_pb2.AddResourceRequest(id=created.id, resource=snap), metadata=md)
        listed = stub.ListResources(
            leases_pb2.ListResourcesRequest(id=created.id), metadata=md
        ).resources
        assert {(r.type, r.id) for r in listed} == {
            ("content", res.id),
            ("snapshots/overlayfs", "k1"),
        }
        bad = leases_pb2.Resource(id="sha256:../../etc/passwd", type="content")
        assert (
            code_of(
                stub.AddResource,
                leases_pb2.AddResourceRequest(id=created.id, resource=bad),
                metadata=md,
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        odd = leases_pb2.Resource(id="x", type="teapots")
        assert (
            code_of(
                stub.AddResource,
                leases_pb2.AddResourceRequest(id=created.id, resource=odd),
                metadata=md,
            )
            == grpc.StatusCode.UNIMPLEMENTED
        )
        stub.DeleteResource(
            leases_pb2.DeleteResourceRequest(id=created.id, resource=snap), metadata=md
        )
        listed = stub.ListResources(
            leases_pb2.ListResourcesRequest(id=created.id), metadata=md
        ).resources
        assert [(r.type, r.id) for r in listed] == [("content", res.id)]
        assert (
            code_of(stub.ListResources, leases_pb2.ListResourcesRequest(id="unknown"), metadata=md)
            == grpc.StatusCode.NOT_FOUND
        )
        # Filters.
        stub.Create(leases_pb2.CreateRequest(id="other", labels={"x": "z"}), metadata=md)
        got = stub.List(leases_pb2.ListRequest(filters=["labels.x==y"]), metadata=md).leases
        assert [x.id for x in got] == [created.id]
        got = stub.List(
            leases_pb2.ListRequest(filters=["id==other", "labels.x==y"]), metadata=md
        ).leases
        assert {x.id for x in got} == {created.id, "other"}
        assert (
            code_of(stub.List, leases_pb2.ListRequest(filters=["labels.x=="]), metadata=md)
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            code_of(stub.List, leases_pb2.ListRequest(filters=["id~=("]), metadata=md)
            == grpc.StatusCode.INVALID_ARGUMENT
        )


def test_lease_expiry_removes_the_lease(daemon: Daemon) -> None:
    import time
    from datetime import UTC, datetime, timedelta

    with daemon.channel() as ch:
        stub = leases_pb2_grpc.LeasesStub(ch)
        md = metadata("expiry")
        soon = (datetime.now(UTC) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        stub.Create(
            leases_pb2.CreateRequest(id="short", labels={"containerd.io/gc.expire": soon}),
            metadata=md,
        )
        stub.Create(
            leases_pb2.CreateRequest(
                id="long", labels={"containerd.io/gc.expire": "2999-01-01T00:00:00Z"}
            ),
            metadata=md,
        )
        deadline = time.monotonic() + 20
        ids = {"short"}
        while "short" in ids and time.monotonic() < deadline:
            time.sleep(0.2)
            ids = {x.id for x in stub.List(leases_pb2.ListRequest(), metadata=md).leases}
        assert ids == {"long"}


def test_introspection_and_health(daemon: Daemon) -> None:
    with daemon.channel() as ch:
        intro = introspection_pb2_grpc.IntrospectionStub(ch)
        srv = intro.Server(empty_pb2.Empty())
        assert srv.uuid and srv.pid > 0
        plugins = intro.Plugins(introspection_pb2.PluginsRequest(filters=["id==broken"])).plugins
        assert len(plugins) == 1 and plugins[0].init_err.message
        ok = intro.Plugins(
            introspection_pb2.PluginsRequest(filters=["type==io.containerd.grpc.v1"])
        ).plugins
        assert ok and all(not p.HasField("init_err") for p in ok)
        assert (
            code_of(intro.Plugins, introspection_pb2.PluginsRequest(filters=["type=="]))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_events_publish_codes(daemon: Daemon) -> None:
    from pycontainerd import typeurl
    from pycontainerd.api.events import namespace_pb2 as ev

    with daemon.channel() as ch:
        stub = events_pb2_grpc.EventsStub(ch)
        payload = typeurl.pack(ev.NamespaceCreate(name="x"))
        assert (
            code_of(stub.Publish, events_pb2.PublishRequest(topic="/test/x", event=payload))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        for bad in ["", "nolead", "/", "/a//b", "/bad topic"]:
            assert (
                code_of(
                    stub.Publish,
                    events_pb2.PublishRequest(topic=bad, event=payload),
                    metadata=metadata(),
                )
                == grpc.StatusCode.INVALID_ARGUMENT
            ), bad
        stub.Publish(
            events_pb2.PublishRequest(topic="/test/ok", event=payload), metadata=metadata()
        )


def test_state_survives_kill9(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    with d.channel() as ch:
        ns = namespace_pb2_grpc.NamespacesStub(ch)
        ns.Create(
            NS.CreateNamespaceRequest(namespace=NS.Namespace(name="durable", labels={"k": "v"}))
        )
        leases_pb2_grpc.LeasesStub(ch).Create(
            leases_pb2.CreateRequest(id="kept", labels={"l": "1"}), metadata=metadata("durable")
        )
        uuid = introspection_pb2_grpc.IntrospectionStub(ch).Server(empty_pb2.Empty()).uuid
    d.kill9()
    d.start()
    with d.channel() as ch:
        got = namespace_pb2_grpc.NamespacesStub(ch).Get(NS.GetNamespaceRequest(name="durable"))
        assert dict(got.namespace.labels) == {"k": "v"}
        leases = (
            leases_pb2_grpc.LeasesStub(ch)
            .List(leases_pb2.ListRequest(), metadata=metadata("durable"))
            .leases
        )
        assert [(x.id, dict(x.labels)) for x in leases] == [("kept", {"l": "1"})]
        assert introspection_pb2_grpc.IntrospectionStub(ch).Server(empty_pb2.Empty()).uuid == uuid
