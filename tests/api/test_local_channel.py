"""The in-process channel (``grpc.local``): our SDK over the daemon's server without a socket.

The real content plugins behind our transport ``Server`` with the production handler
wrapper, driven by ``pycontainerd.client`` — unary, server-streaming and bidirectional
calls, the namespace header, error mapping, cancellation and deadlines.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
import pytest

from pycontainerd.api.services.content.v1 import content_pb2, content_pb2_grpc
from pycontainerd.client import Client
from pycontainerd.errdefs import NotFound, Unimplemented
from pycontainerd.grpc.content import ContentService
from pycontainerd.grpc.interceptors import wrap_handler
from pycontainerd.grpc.local import LocalChannel
from pycontainerd.grpc.transport import Server
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import PluginType
from tests.api.test_content_api import build_plugins

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[LocalChannel]:
    plugins = await build_plugins(tmp_path)
    server = Server(wrap=wrap_handler)
    svc = plugins.get(PluginType.GRPC, "content")
    assert svc is not None
    assert isinstance(svc.instance, ContentService)
    svc.instance.register(cast("grpc.aio.Server", server))
    yield LocalChannel(server)
    db = plugins.get(PluginType.METADATA, "bolt")
    assert db is not None
    assert isinstance(db.instance, MetadataDB)
    await db.instance.close()


def content_stub(channel: LocalChannel) -> content_pb2_grpc.ContentAsyncStub:
    return content_pb2_grpc.ContentStub(cast("grpc.aio.Channel", channel))


def client(channel: LocalChannel, namespace: str = "default") -> Client:
    return Client("local", namespace, channel=cast("grpc.aio.Channel", channel))


async def test_sdk_round_trip(channel: LocalChannel) -> None:
    c = client(channel)
    data = bytes(range(256)) * 20_000  # several chunks each way
    assert await c.content.ingest("ref-1", data, expected=sha(data), size=len(data))
    info = await c.content.info(sha(data))
    assert info.size == len(data)
    assert await c.content.read_all(sha(data), limit=len(data)) == data
    got = b"".join([chunk async for chunk in c.content.read(sha(data), offset=10, size=100)])
    assert got == data[10:110]
    # Namespaces are per call, from the header: another namespace does not see it.
    with pytest.raises(NotFound):
        await client(channel, "other").content.info(sha(data))


async def test_errors_carry_the_status(channel: LocalChannel) -> None:
    stub = content_stub(channel)
    md = (("containerd-namespace", "default"),)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Info(content_pb2.InfoRequest(digest=sha(b"nope")), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Info(content_pb2.InfoRequest(digest=sha(b"nope")))  # no namespace
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # as containerd
    unknown = channel.unary_unary("/nothing.Here/Call")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unknown(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(Unimplemented):
        await client(channel).call(unknown, b"")


async def test_messages_are_copies(channel: LocalChannel) -> None:
    """Neither side can change the other's message (as over a socket)."""
    c = client(channel)
    await c.content.ingest("ref-2", b"abc", expected=sha(b"abc"), size=3, labels={"a": "1"})
    stub = content_stub(channel)
    md = (("containerd-namespace", "default"),)
    req = content_pb2.InfoRequest(digest=sha(b"abc"))
    first = await stub.Info(req, metadata=md)
    first.info.labels["a"] = "changed"
    second = await stub.Info(req, metadata=md)
    assert second.info.labels["a"] == "1"


async def drain(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_cancel_a_stream_midway(channel: LocalChannel) -> None:
    c = client(channel)
    data = b"x" * (4 << 20)
    await c.content.ingest("ref-3", data, expected=sha(data), size=len(data))
    stub = content_stub(channel)
    call = stub.Read(
        content_pb2.ReadContentRequest(digest=sha(data)),
        metadata=(("containerd-namespace", "default"),),
    )
    first = await call.read()
    assert isinstance(first, content_pb2.ReadContentResponse)
    assert first.data
    assert call.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await drain(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    # The ingest writer of another call is unaffected and the store still serves.
    assert (await c.content.info(sha(data))).size == len(data)


async def test_deadline(channel: LocalChannel) -> None:
    stub = content_stub(channel)
    call = stub.Write(metadata=(("containerd-namespace", "default"),), timeout=0.2)
    await call.write(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="slow"))
    first = await call.read()
    assert isinstance(first, content_pb2.WriteContentResponse)
    assert first.offset == 0
    await asyncio.sleep(0.4)  # the writer never sends more: the deadline ends the call
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The ref's lock was released with the call: a new writer may take it.
    again = stub.Write(metadata=(("containerd-namespace", "default"),))
    await again.write(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="slow"))
    resp = await again.read()
    assert isinstance(resp, content_pb2.WriteContentResponse)
    assert resp.offset == 0
    await again.done_writing()
