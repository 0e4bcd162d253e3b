"""containerd.services.content.v1.Content over a real grpc.aio server and the generated stubs.

The plugins are built through their registrations (exchange, metadata, content store,
content service, gRPC service), so the wiring is tested too. Write is driven exactly as
ctr drives it (ctr-contract.md §2.1).
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2

from pycontainerd.api.events import content_pb2 as content_events
from pycontainerd.api.services.content.v1 import content_pb2, content_pb2_grpc
from pycontainerd.content.metadata import NamespacedContentStore
from pycontainerd.events.exchange import Exchange
from pycontainerd.grpc.content import ContentService
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import InitContext, Plugin, PluginSet, PluginType
from pycontainerd.plugins import content as content_plugin
from pycontainerd.plugins import core, events

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    Serve = Callable[..., Awaitable[grpc.aio.Channel]]

NS = (("containerd-namespace", "default"),)
MiB = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def build_plugins(tmp_path: Path) -> PluginSet:
    plugins = PluginSet()
    for reg in (
        events.exchange,
        core.metadata,
        content_plugin.content,
        content_plugin.content_service,
        content_plugin.service,
    ):
        ic = InitContext(
            registration=reg,
            root=tmp_path / "root" / reg.uri,
            state=tmp_path / "state" / reg.uri,
            config=None,
            plugins=plugins,
        )
        plugins.add(Plugin(registration=reg, instance=await reg.init(ic)))
    return plugins


@pytest.fixture
async def plugins(tmp_path: Path) -> AsyncIterator[PluginSet]:
    ps = await build_plugins(tmp_path)
    yield ps
    db = ps.get(PluginType.METADATA, "bolt")
    assert db is not None
    assert isinstance(db.instance, MetadataDB)
    await db.instance.close()


@pytest.fixture
async def stub(plugins: PluginSet, serve: Serve) -> content_pb2_grpc.ContentAsyncStub:
    svc = plugins.get(PluginType.GRPC, "content")
    assert svc is not None
    assert isinstance(svc.instance, ContentService)
    channel = await serve(svc.instance)
    return content_pb2_grpc.ContentStub(channel)


def store_of(plugins: PluginSet) -> NamespacedContentStore:
    p = plugins.get(PluginType.SERVICE, "content-service")
    assert p is not None
    assert isinstance(p.instance, NamespacedContentStore)
    return p.instance


WriteCall = Any  # grpc.aio.StreamStreamCall[WriteContentRequest, WriteContentResponse]


async def ask(call: WriteCall, **fields: Any) -> content_pb2.WriteContentResponse:
    await call.write(content_pb2.WriteContentRequest(**fields))
    resp = await call.read()
    assert isinstance(resp, content_pb2.WriteContentResponse), resp
    return resp


async def ctr_write(
    stub: content_pb2_grpc.ContentAsyncStub,
    ref: str,
    data: bytes,
    labels: dict[str, str] | None = None,
    metadata: tuple[tuple[str, str], ...] = NS,
) -> content_pb2.WriteContentResponse:
    """The exact exchange of ctr's content writer (content.WriteBlob over the proxy)."""
    call = stub.Write(metadata=metadata)
    first = await ask(call, action=content_pb2.STAT, ref=ref, total=len(data))
    assert first.action == content_pb2.STAT
    assert first.total == len(data)
    assert first.offset == 0
    assert first.digest == sha(b"")
    assert first.started_at.seconds > 0
    second = await ask(call)  # Status(): an empty STAT
    assert second.offset == 0
    offset = 0
    while offset < len(data):
        chunk = data[offset : offset + MiB]
        resp = await ask(call, action=content_pb2.WRITE, offset=offset, data=chunk)
        offset += len(chunk)
        assert resp.action == content_pb2.WRITE
        assert resp.offset == offset
        assert resp.total == len(data), "fields of earlier answers carry over"
        assert resp.digest == sha(data[:offset])
    done = await ask(
        call,
        action=content_pb2.COMMIT,
        total=len(data),
        offset=offset,
        expected=sha(data),
        labels=labels or {},
    )
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return done


async def test_ctr_write_then_read(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    data = os.urandom(3 * MiB + 12345)
    done = await ctr_write(stub, "tar-blobs/sha256/" + sha(data)[7:], data, {"a": "b"})
    assert done.action == content_pb2.COMMIT
    assert (done.offset, done.total, done.digest) == (len(data), len(data), sha(data))

    info = (await stub.Info(content_pb2.InfoRequest(digest=sha(data)), metadata=NS)).info
    assert (info.digest, info.size, dict(info.labels)) == (sha(data), len(data), {"a": "b"})
    assert info.created_at.seconds > 0

    chunks = [
        r
        async for r in stub.Read(
            content_pb2.ReadContentRequest(digest=sha(data), offset=MiB - 5, size=2 * MiB),
            metadata=NS,
        )
    ]
    assert b"".join(c.data for c in chunks) == data[MiB - 5 : 3 * MiB - 5]
    assert all(len(c.data) <= MiB for c in chunks)
    assert chunks[0].offset == MiB - 5
    whole = stub.Read(content_pb2.ReadContentRequest(digest=sha(data)), metadata=NS)
    assert b"".join([r.data async for r in whole]) == data

    listed = [
        i.digest
        async for batch in stub.List(content_pb2.ListContentRequest(), metadata=NS)
        for i in batch.info
    ]
    assert listed == [sha(data)]
    statuses = await stub.ListStatuses(content_pb2.ListStatusesRequest(filters=[""]), metadata=NS)
    assert list(statuses.statuses) == []

    await stub.Delete(content_pb2.DeleteContentRequest(digest=sha(data)), metadata=NS)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Info(content_pb2.InfoRequest(digest=sha(data)), metadata=NS)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_read_errors_and_cancel(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    data = os.urandom(4 * MiB)
    await ctr_write(stub, "r", data)
    call = stub.Read(
        content_pb2.ReadContentRequest(digest=sha(data), offset=len(data) + 1), metadata=NS
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.OUT_OF_RANGE
    # The Go ReaderAt cancels the stream once it has what it asked for.
    call = stub.Read(content_pb2.ReadContentRequest(digest=sha(data)), metadata=NS)
    first = await call.read()
    assert isinstance(first, content_pb2.ReadContentResponse)
    assert first.data == data[:MiB]
    call.cancel()
    resp = await stub.Info(content_pb2.InfoRequest(digest=sha(data)), metadata=NS)
    assert resp.info.size == len(data)


@pytest.mark.parametrize(
    "digest",
    ["sha256:../../etc/passwd", "sha256:" + "a" * 63, "sha256:" + "A" * 64, "md5:abc", ""],
)
async def test_bad_digests(stub: content_pb2_grpc.ContentAsyncStub, digest: str) -> None:
    calls: list[Awaitable[Any]] = [
        stub.Info(content_pb2.InfoRequest(digest=digest), metadata=NS),
        stub.Delete(content_pb2.DeleteContentRequest(digest=digest), metadata=NS),
        stub.Update(content_pb2.UpdateRequest(info=content_pb2.Info(digest=digest)), metadata=NS),
    ]
    for c in calls:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    read = stub.Read(content_pb2.ReadContentRequest(digest=digest), metadata=NS)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await read.read()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_namespace_required(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Info(content_pb2.InfoRequest(digest=sha(b"")))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    call = stub.Write()
    await call.write(content_pb2.WriteContentRequest(ref="r"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_first_message_needs_ref(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    call = stub.Write(metadata=NS)
    await call.write(content_pb2.WriteContentRequest(action=content_pb2.STAT, total=3))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must have a reference" in (exc.value.details() or "")


async def test_offset_protocol(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    call = stub.Write(metadata=NS)
    await ask(call, action=content_pb2.STAT, ref="r")
    assert (await ask(call, action=content_pb2.WRITE, offset=0, data=b"abc")).offset == 3
    await call.write(content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=9, data=b"x"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "write @9 must occur at current offset 3" in (exc.value.details() or "")

    st = await stub.Status(content_pb2.StatusRequest(ref="r"), metadata=NS)
    assert (st.status.ref, st.status.offset) == ("r", 3)

    call = stub.Write(metadata=NS)
    resp = await ask(call, action=content_pb2.STAT, ref="r")
    assert resp.offset == 3, "a new stream resumes the ingest"
    assert (await ask(call, action=content_pb2.WRITE, offset=0, data=b"")).offset == 0
    await call.write(
        content_pb2.WriteContentRequest(action=content_pb2.COMMIT, total=7, offset=0, data=b"xy")
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    await stub.Abort(content_pb2.AbortRequest(ref="r"), metadata=NS)
    gone: list[Awaitable[Any]] = [
        stub.Abort(content_pb2.AbortRequest(ref="r"), metadata=NS),
        stub.Status(content_pb2.StatusRequest(ref="r"), metadata=NS),
    ]
    for c in gone:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_wrong_digest_then_resume(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    call = stub.Write(metadata=NS)
    await ask(call, action=content_pb2.STAT, ref="r", total=4)
    await ask(call, action=content_pb2.WRITE, offset=0, data=b"data")
    await call.write(
        content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT, total=4, offset=4, expected=sha(b"else")
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Info(content_pb2.InfoRequest(digest=sha(b"data")), metadata=NS)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    call = stub.Write(metadata=NS)
    assert (await ask(call, action=content_pb2.STAT, ref="r", total=4)).offset == 4
    done = await ask(call, action=content_pb2.COMMIT, total=4, offset=4, expected=sha(b"data"))
    assert done.digest == sha(b"data")


async def test_commit_existing_digest(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    await ctr_write(stub, "one", b"same bytes")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await ctr_write(stub, "two", b"same bytes")
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    statuses = await stub.ListStatuses(content_pb2.ListStatusesRequest(), metadata=NS)
    assert list(statuses.statuses) == [], "the duplicate ingest was aborted"


async def test_concurrent_writers(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    one = stub.Write(metadata=NS)
    await ask(one, action=content_pb2.STAT, ref="r")
    await ask(one, action=content_pb2.WRITE, offset=0, data=b"12345")
    two = stub.Write(metadata=NS)
    await two.write(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="r"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await two.read()
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "locked" in (exc.value.details() or "")
    other_ns = stub.Write(metadata=(("containerd-namespace", "other"),))
    assert (await ask(other_ns, action=content_pb2.STAT, ref="r")).offset == 0
    one.cancel()
    # After the first stream is gone the ref opens again, at the first stream's offset
    # (the server's cleanup may still be running: the lock wait covers it).
    three = stub.Write(metadata=NS)
    assert (await ask(three, action=content_pb2.STAT, ref="r")).offset == 5
    three.cancel()
    other_ns.cancel()


async def test_cross_namespace_share(
    stub: content_pb2_grpc.ContentAsyncStub, plugins: PluginSet
) -> None:
    data = os.urandom(MiB)
    await ctr_write(stub, "r", data)
    other = (("containerd-namespace", "other"),)
    call = stub.Write(metadata=other)
    resp = await ask(call, action=content_pb2.STAT, ref="r2", total=len(data), expected=sha(data))
    assert resp.offset == len(data), "shared content needs no upload"
    done = await ask(
        call, action=content_pb2.COMMIT, total=len(data), offset=len(data), expected=sha(data)
    )
    assert done.digest == sha(data)
    info = await stub.Info(content_pb2.InfoRequest(digest=sha(data)), metadata=other)
    assert info.info.size == len(data)


async def test_update_labels_and_delete_event(
    stub: content_pb2_grpc.ContentAsyncStub, plugins: PluginSet
) -> None:
    await ctr_write(stub, "r", b"labelled", {"a": "1"})
    resp = await stub.Update(
        content_pb2.UpdateRequest(
            info=content_pb2.Info(
                digest=sha(b"labelled"), labels={"containerd.io/gc.ref.content.l.0": "x"}
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.containerd.io/gc.ref.content.l.0"]),
        ),
        metadata=NS,
    )
    assert dict(resp.info.labels) == {"a": "1", "containerd.io/gc.ref.content.l.0": "x"}
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Update(
            content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=sha(b"labelled")),
                update_mask=field_mask_pb2.FieldMask(paths=["size"]),
            ),
            metadata=NS,
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    ex = plugins.get(PluginType.EVENT, "exchange")
    assert ex is not None
    assert isinstance(ex.instance, Exchange)
    sub = ex.instance.subscribe(['topic=="/content/delete"'])
    await stub.Delete(content_pb2.DeleteContentRequest(digest=sha(b"labelled")), metadata=NS)
    envelope = await anext(sub)
    sub.close()
    assert (envelope.namespace, envelope.topic) == ("default", "/content/delete")
    assert envelope.event.type_url == "containerd.events.ContentDelete"
    event = content_events.ContentDelete.FromString(envelope.event.value)
    assert event.digest == sha(b"labelled")


async def test_cancelled_streams_release_the_ref(stub: content_pb2_grpc.ContentAsyncStub) -> None:
    # grpc.aio cancels a handler again while its finally block runs; the ref must still be
    # unlocked every time, or the next stream would fail with UNAVAILABLE.
    for i in range(20):
        call = stub.Write(metadata=NS)
        resp = await ask(call, action=content_pb2.STAT, ref="flaky")
        assert resp.offset == i
        await ask(call, action=content_pb2.WRITE, offset=i, data=b"x")
        call.cancel()
