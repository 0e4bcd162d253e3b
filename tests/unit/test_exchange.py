"""The event exchange: ordering, bounded queues, filters, validation, and type URLs."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from pycontainerd import typeurl
from pycontainerd.api.events import container_pb2, image_pb2, task_pb2
from pycontainerd.api.services.events.v1.events_pb2 import Envelope
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from pycontainerd.events import Publisher, topics
from pycontainerd.events.exchange import Exchange, Subscription
from pycontainerd.namespaces import current_namespace


def test_exchange_is_a_publisher() -> None:
    assert isinstance(Exchange(), Publisher)


async def test_every_subscriber_gets_every_event_in_order() -> None:
    # Publish everything before anyone reads (containerd's TestExchangeBasic), with 100
    # subscribers and 10,000 events: buffering, fan-out and order.
    ex = Exchange()
    subs = [ex.subscribe() for _ in range(100)]
    for i in range(10_000):
        ex.publish(topics.TASK_START, task_pb2.TaskStart(container_id="c", pid=i), "default")
    for sub in subs:
        assert sub.pending() == 10_000
        pids = [
            task_pb2.TaskStart.FromString((await anext(sub)).event.value).pid for _ in range(10_000)
        ]
        assert pids == list(range(10_000))
        assert sub.pending() == 0
        sub.close()
    assert ex.subscribers == 0


async def test_concurrent_readers_see_publish_order() -> None:
    ex = Exchange()
    n = 10_000
    received: list[list[int]] = [[] for _ in range(100)]

    async def reader(sub: Subscription, into: list[int]) -> None:
        async with sub:
            async for env in sub:
                into.append(task_pb2.TaskStart.FromString(env.event.value).pid)
                if len(into) == n:
                    return

    readers = [asyncio.create_task(reader(ex.subscribe(), r)) for r in received]
    for i in range(n):
        ex.publish(topics.TASK_START, task_pb2.TaskStart(container_id="c", pid=i), "default")
        if i % 997 == 0:
            await asyncio.sleep(0)  # let readers drain part-way, in uneven batches
    await asyncio.gather(*readers)
    for r in received:
        assert r == list(range(n))
    assert ex.subscribers == 0


async def test_slow_subscriber_is_cut_off_without_delaying_others() -> None:
    ex = Exchange(queue_size=8)
    stuck = ex.subscribe()
    fast = ex.subscribe(queue_size=1000)
    got: list[str] = []
    for i in range(20):
        ex.publish(topics.CONTAINER_CREATE, container_pb2.ContainerCreate(id=f"c{i}"), "default")
        # The fast subscriber keeps up; publish never waits for the stuck one.
        env = await anext(fast)
        got.append(container_pb2.ContainerCreate.FromString(env.event.value).id)
    assert got == [f"c{i}" for i in range(20)]
    assert ex.subscribers == 1  # the stuck one was removed at its 9th event
    assert stuck.closed
    assert stuck.pending() == 0  # its backlog was dropped
    with pytest.raises(ResourceExhausted):
        await anext(stuck)
    with pytest.raises(ResourceExhausted):
        async for _ in stuck.raw():
            pass
    fast.close()


async def test_waiting_subscriber_is_cut_off_too() -> None:
    ex = Exchange(queue_size=2)
    sub = ex.subscribe()
    for _ in range(3):
        ex.publish(topics.TASK_OOM, task_pb2.TaskOOM(container_id="c"), "default")
    with pytest.raises(ResourceExhausted):
        await anext(sub)


async def test_close_wakes_a_waiting_reader() -> None:
    ex = Exchange()
    sub = ex.subscribe()
    result: list[Envelope] = []

    async def read() -> None:
        async for env in sub:
            result.append(env)

    task = asyncio.create_task(read())
    await asyncio.sleep(0)
    ex.publish(topics.TASK_PAUSED, task_pb2.TaskPaused(container_id="a"), "default")
    await asyncio.sleep(0)
    sub.close()
    await task  # ends with StopAsyncIteration, not a hang
    assert [e.topic for e in result] == [topics.TASK_PAUSED]
    sub.close()  # idempotent
    ex.publish(topics.TASK_PAUSED, task_pb2.TaskPaused(container_id="b"), "default")
    assert sub.pending() == 0


async def test_exchange_close_ends_all_subscriptions() -> None:
    ex = Exchange()
    subs = [ex.subscribe() for _ in range(3)]
    ex.close()
    assert ex.subscribers == 0
    for sub in subs:
        with pytest.raises(StopAsyncIteration):
            await anext(sub)


async def test_envelope_fields_and_bare_type_url() -> None:
    ex = Exchange()
    async with ex.subscribe() as sub:
        ex.publish(topics.IMAGE_CREATE, image_pb2.ImageCreate(name="busybox"), "ns1")
        pub = await sub.next_published()
    env = pub.envelope
    assert env.namespace == "ns1"
    assert env.topic == "/images/create"
    assert env.event.type_url == "containerd.services.images.v1.ImageCreate"
    assert env.timestamp.seconds > 0
    assert Envelope.FromString(pub.data) == env
    decoded = typeurl.unpack(env.event)
    assert isinstance(decoded, image_pb2.ImageCreate)
    assert decoded.name == "busybox"


async def test_events_are_serialized_once_and_shared() -> None:
    ex = Exchange()
    a, b = ex.subscribe(), ex.subscribe(["topic~=|^/tasks/|"])
    ex.publish(topics.TASK_EXIT, task_pb2.TaskExit(container_id="c", exit_status=3), "default")
    pa, pb = await a.next_published(), await b.next_published()
    assert pa is pb
    assert pa.data == pa.envelope.SerializeToString()


async def test_namespace_comes_from_the_request_context() -> None:
    ex = Exchange()
    sub = ex.subscribe()
    token = current_namespace.set("ctx-ns")
    try:
        ex.publish(topics.NAMESPACE_CREATE, container_pb2.ContainerDelete(id="x"))
    finally:
        current_namespace.reset(token)
    assert (await anext(sub)).namespace == "ctx-ns"
    with pytest.raises(FailedPrecondition):
        ex.publish(topics.NAMESPACE_CREATE, container_pb2.ContainerDelete(id="x"))
    with pytest.raises(InvalidArgument):
        ex.publish(topics.NAMESPACE_CREATE, container_pb2.ContainerDelete(id="x"), "bad ns!")
    assert sub.pending() == 0


async def test_publish_of_an_any_keeps_it() -> None:
    ex = Exchange()
    sub = ex.subscribe(["event.id==c9"])
    packed = any_pb2.Any(
        type_url="containerd.events.ContainerDelete",
        value=container_pb2.ContainerDelete(id="c9").SerializeToString(),
    )
    ex.publish(topics.CONTAINER_DELETE, packed, "default")
    env = await anext(sub)
    assert env.event == packed


@pytest.mark.parametrize(
    "topic",
    ["", "tasks/exit", "/", "/tasks/", "//x", "/tasks/exit!", "/tasks/ exit", "/" + "a" * 77],
)
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(InvalidArgument):
        topics.validate(topic)
    ex = Exchange()
    sub = ex.subscribe()
    with pytest.raises(InvalidArgument):
        ex.publish(topic, task_pb2.TaskOOM(), "default")
    assert sub.pending() == 0


@pytest.mark.parametrize("topic", [*sorted(topics.ALL), "/custom/topic.v1/a_b-c", "/x"])
def test_valid_topics(topic: str) -> None:
    assert topics.validate(topic) == topic


def test_topic_constants_match_containerd() -> None:
    assert topics.TASK_EXIT == "/tasks/exit"
    assert topics.SNAPSHOT_PREPARE == "/snapshot/prepare"  # singular, as containerd
    assert topics.TASK_EXEC_STARTED == "/tasks/exec-started"
    assert len(topics.ALL) == 24


async def test_filters_on_topic_namespace_and_event_fields() -> None:
    ex = Exchange()
    by_topic = ex.subscribe(['topic=="/tasks/exit"'])
    by_prefix = ex.subscribe(["topic~=|^/containers/|"])
    by_ns = ex.subscribe(["namespace==other"])
    by_event = ex.subscribe(["event.container_id==c2"])
    either = ex.subscribe(["namespace==other", 'topic=="/tasks/exit",event.id==e1'])
    everything = ex.subscribe([])
    ex.publish(topics.TASK_EXIT, task_pb2.TaskExit(container_id="c1", id="c1"), "default")
    ex.publish(topics.TASK_EXIT, task_pb2.TaskExit(container_id="c2", id="e1"), "default")
    ex.publish(topics.CONTAINER_CREATE, container_pb2.ContainerCreate(id="c2"), "other")
    ex.publish(topics.TASK_START, task_pb2.TaskStart(container_id="c2"), "default")

    def seen(sub: Subscription) -> list[tuple[str, str]]:
        out = []
        while sub.pending():
            env = sub._queue.popleft().envelope
            out.append((env.topic, env.namespace))
        return out

    assert seen(by_topic) == [("/tasks/exit", "default")] * 2
    assert seen(by_prefix) == [("/containers/create", "other")]
    assert seen(by_ns) == [("/containers/create", "other")]
    assert seen(by_event) == [("/tasks/exit", "default"), ("/tasks/start", "default")]
    assert seen(either) == [("/tasks/exit", "default"), ("/containers/create", "other")]
    assert len(seen(everything)) == 4


async def test_subscribers_with_the_same_filter_share_it() -> None:
    ex = Exchange()
    a, b = ex.subscribe(['topic=="/a"']), ex.subscribe(['topic=="/a"'])
    assert a.filter is not None
    assert a.filter is b.filter
    ex.publish("/a", task_pb2.TaskOOM(), "default")
    ex.publish("/b", task_pb2.TaskOOM(), "default")
    assert (a.pending(), b.pending()) == (1, 1)


def test_invalid_filter_on_subscribe() -> None:
    ex = Exchange()
    with pytest.raises(InvalidArgument):
        ex.subscribe(["topic=/x"])
    assert ex.subscribers == 0


async def test_forward_validation() -> None:
    ex = Exchange()
    sub = ex.subscribe()
    event = typeurl.pack(task_pb2.TaskExit(container_id="c"))
    ok = Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        namespace="default",
        topic=topics.TASK_EXIT,
        event=event,
    )
    ex.forward(ok)
    got = await sub.next_published()
    assert got.envelope == ok
    assert got.data == ok.SerializeToString()

    bad = [
        Envelope(namespace="default", topic=topics.TASK_EXIT, event=event),  # no timestamp
        Envelope(
            timestamp=timestamp_pb2.Timestamp(seconds=-62135596800),
            namespace="default",
            topic=topics.TASK_EXIT,
            event=event,
        ),  # Go's zero time
        Envelope(
            timestamp=timestamp_pb2.Timestamp(seconds=1),
            namespace="",
            topic=topics.TASK_EXIT,
            event=event,
        ),
        Envelope(
            timestamp=timestamp_pb2.Timestamp(seconds=1),
            namespace="a b",
            topic=topics.TASK_EXIT,
            event=event,
        ),
        Envelope(
            timestamp=timestamp_pb2.Timestamp(seconds=1),
            namespace="default",
            topic="tasks",
            event=event,
        ),
    ]
    for env in bad:
        with pytest.raises(InvalidArgument):
            ex.forward(env)
    assert sub.pending() == 0


async def test_forwarded_event_filters_decode_the_any_once() -> None:
    ex = Exchange()
    sub = ex.subscribe(["event.container_id==c"])
    other = ex.subscribe(["event.container_id==d"])
    env = Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=5),
        namespace="default",
        topic=topics.TASK_EXIT,
        event=typeurl.pack(task_pb2.TaskExit(container_id="c")),
    )
    ex.forward(env)
    unknown = Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=5),
        namespace="default",
        topic=topics.TASK_EXIT,
        event=any_pb2.Any(type_url="example.com/Nope", value=b"\x01"),
    )
    ex.forward(unknown)  # undecodable payload: event.* is absent, nothing breaks
    assert sub.pending() == 1
    assert other.pending() == 0


def test_typeurl_pack_and_unpack() -> None:
    msg = task_pb2.TaskExit(container_id="c", pid=3)
    packed = typeurl.pack(msg)
    assert packed.type_url == "containerd.events.TaskExit"
    assert typeurl.unpack(packed) == msg
    prefixed = any_pb2.Any()
    prefixed.Pack(msg)
    assert prefixed.type_url.startswith("type.googleapis.com/")
    assert typeurl.unpack(prefixed) == msg
    assert typeurl.pack(packed) is packed
    with pytest.raises(NotFound):
        typeurl.unpack(any_pb2.Any(type_url="containerd.events.Nope"))
    with pytest.raises(InvalidArgument):
        typeurl.unpack(any_pb2.Any())
    with pytest.raises(InvalidArgument):
        typeurl.unpack(any_pb2.Any(type_url="containerd.events.TaskExit", value=b"\xff\xff"))


def test_bad_queue_size() -> None:
    with pytest.raises(InvalidArgument):
        Exchange(queue_size=0)
    with pytest.raises(InvalidArgument):
        Exchange().subscribe(queue_size=0)
