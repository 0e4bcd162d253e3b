"""containerd.services.events.v1.Events over a real grpc.aio server and the generated stubs."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, timestamp_pb2

from pycontainerd import typeurl
from pycontainerd.api.events import container_pb2, task_pb2
from pycontainerd.api.services.events.v1 import events_pb2, events_pb2_grpc
from pycontainerd.events.exchange import Exchange
from pycontainerd.grpc.events import EventsService
from pycontainerd.plugin import InitContext, Plugin, PluginSet, PluginType
from pycontainerd.plugins import events as events_plugin

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    Serve = Callable[..., Awaitable[grpc.aio.Channel]]

NS = (("containerd-namespace", "default"),)


async def start_plugins(tmp_path: Path, queue_size: int = 65536) -> tuple[Exchange, EventsService]:
    """Build the exchange and the service through their plugin registrations."""
    plugins = PluginSet()
    regs: list[Any] = [events_plugin.exchange, events_plugin.service]
    configs = [events_plugin.ExchangeConfig(queue_size=queue_size), None]
    for reg, config in zip(regs, configs, strict=True):
        ic = InitContext(
            registration=reg,
            root=tmp_path / "root" / reg.uri,
            state=tmp_path / "state" / reg.uri,
            config=config,
            plugins=plugins,
        )
        plugins.add(Plugin(registration=reg, instance=await reg.init(ic)))
    ex = plugins.get(PluginType.EVENT, "exchange")
    svc = plugins.get(PluginType.GRPC, "events")
    assert ex is not None
    assert svc is not None
    assert isinstance(ex.instance, Exchange)
    assert isinstance(svc.instance, EventsService)
    assert svc.instance.exchange is ex.instance
    return ex.instance, svc.instance


async def subscribed(ex: Exchange, count: int) -> None:
    """Wait until the server side has registered ``count`` subscriptions."""
    for _ in range(10_000):
        if ex.subscribers == count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"expected {count} subscribers, have {ex.subscribers}")


async def read(call: Any) -> events_pb2.Envelope:
    env = await call.read()
    assert isinstance(env, events_pb2.Envelope), env
    return env


def task_exit(container_id: str) -> any_pb2.Any:
    return typeurl.pack(task_pb2.TaskExit(container_id=container_id, id=container_id, pid=9))


async def test_publish_reaches_subscriber_with_bare_type_url(serve: Serve, tmp_path: Path) -> None:
    ex, svc = await start_plugins(tmp_path)
    stub = events_pb2_grpc.EventsStub(await serve(svc))
    call = stub.Subscribe(events_pb2.SubscribeRequest(), metadata=NS)
    await subscribed(ex, 1)
    await stub.Publish(
        events_pb2.PublishRequest(topic="/tasks/exit", event=task_exit("c1")),
        metadata=(("containerd-namespace", "other"),),
    )
    env = await read(call)
    # A subscriber in namespace "default" sees events of every namespace.
    assert env.namespace == "other"
    assert env.topic == "/tasks/exit"
    assert env.event.type_url == "containerd.events.TaskExit"
    assert env.timestamp.seconds > 0
    assert task_pb2.TaskExit.FromString(env.event.value).container_id == "c1"
    call.cancel()
    await subscribed(ex, 0)  # the handler's finally closed the subscription


async def test_in_process_publish_is_streamed(serve: Serve, tmp_path: Path) -> None:
    ex, svc = await start_plugins(tmp_path)
    stub = events_pb2_grpc.EventsStub(await serve(svc))
    call = stub.Subscribe(events_pb2.SubscribeRequest(filters=["namespace==n2"]), metadata=NS)
    await subscribed(ex, 1)
    for i in range(100):
        ex.publish("/containers/create", container_pb2.ContainerCreate(id=f"c{i}"), "n1")
        ex.publish("/containers/create", container_pb2.ContainerCreate(id=f"c{i}"), "n2")
    ids = []
    for _ in range(100):
        env = await read(call)
        assert env.namespace == "n2"
        ids.append(container_pb2.ContainerCreate.FromString(env.event.value).id)
    assert ids == [f"c{i}" for i in range(100)]
    call.cancel()


async def test_publish_without_namespace(serve: Serve, tmp_path: Path) -> None:
    _, svc = await start_plugins(tmp_path)
    stub = events_pb2_grpc.EventsStub(await serve(svc))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Publish(events_pb2.PublishRequest(topic="/tasks/exit", event=task_exit("c")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("topic", ["", "tasks/exit", "/", "/tasks/bad topic"])
async def test_publish_bad_topic(serve: Serve, tmp_path: Path, topic: str) -> None:
    _, svc = await start_plugins(tmp_path)
    stub = events_pb2_grpc.EventsStub(await serve(svc))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Publish(
            events_pb2.PublishRequest(topic=topic, event=task_exit("c")), metadata=NS
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_forward(serve: Serve, tmp_path: Path) -> None:
    ex, svc = await start_plugins(tmp_path)
    stub = events_pb2_grpc.EventsStub(await serve(svc))
    call = stub.Subscribe(events_pb2.SubscribeRequest(filters=["event.container_id==c7"]))
    await subscribed(ex, 1)
    good = events_pb2.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5),
        namespace="shimns",
        topic="/tasks/exit",
        event=task_exit("c7"),
    )
    # Forward needs no namespace header: the envelope carries its own.
    await stub.Forward(events_pb2.ForwardRequest(envelope=good))
    assert await read(call) == good
    zero_time = events_pb2.Envelope(namespace="shimns", topic="/tasks/exit", event=task_exit("c"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Forward(events_pb2.ForwardRequest(envelope=zero_time))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    call.cancel()


async def test_subscribe_with_bad_filter_is_unknown(serve: Serve, tmp_path: Path) -> None:
    # containerd's quirk: the parse error is wrapped without a class, so UNKNOWN.
    ex, svc = await start_plugins(tmp_path)
    stub = events_pb2_grpc.EventsStub(await serve(svc))
    call = stub.Subscribe(events_pb2.SubscribeRequest(filters=["topic=/x"]), metadata=NS)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert "failed parsing subscription filters" in (err.value.details() or "")
    assert ex.subscribers == 0


async def test_stuck_subscriber_gets_resource_exhausted(serve: Serve, tmp_path: Path) -> None:
    ex, svc = await start_plugins(tmp_path, queue_size=4)
    stub = events_pb2_grpc.EventsStub(await serve(svc))
    stuck = stub.Subscribe(events_pb2.SubscribeRequest(), metadata=NS)
    await subscribed(ex, 1)
    # Published without yielding to the loop, so the handler cannot drain in between.
    for i in range(10):
        ex.publish("/tasks/oom", task_pb2.TaskOOM(container_id=f"c{i}"), "default")
    assert ex.subscribers == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stuck:
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A new subscriber works normally afterwards.
    fresh = stub.Subscribe(events_pb2.SubscribeRequest(), metadata=NS)
    await subscribed(ex, 1)
    ex.publish("/tasks/oom", task_pb2.TaskOOM(container_id="after"), "default")
    env = await read(fresh)
    assert task_pb2.TaskOOM.FromString(env.event.value).container_id == "after"
    fresh.cancel()
