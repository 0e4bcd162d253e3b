"""Content.Write's request decoder: protobuf's answer, without copying the data."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc.aio
import pytest
from google.protobuf.message import DecodeError

from pycontainerd.api.services.content.v1 import content_pb2
from pycontainerd.grpc.content import ContentService, decode_write_request
from pycontainerd.grpc.transport import Server

REQUESTS = [
    content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="import-1"),
    content_pb2.WriteContentRequest(
        action=content_pb2.WRITE, ref="r", offset=1 << 20, data=bytes(range(256)) * 4096
    ),
    content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref="r", data=b"x"),
    content_pb2.WriteContentRequest(
        action=content_pb2.COMMIT,
        ref="r",
        total=12,
        offset=7,
        expected="sha256:" + "ab" * 32,
        data=b"hello world!",
        labels={"containerd.io/gc.root": "1", "k": "v"},
    ),
    content_pb2.WriteContentRequest(action=content_pb2.COMMIT, total=0, labels={"a": "b"}),
    content_pb2.WriteContentRequest(),
]


def _same(raw: bytes) -> None:
    want = content_pb2.WriteContentRequest.FromString(raw)
    got = decode_write_request(raw)
    assert bytes(got.data) == want.data
    assert (got.action, got.ref, got.total, got.expected, got.offset) == (
        want.action,
        want.ref,
        want.total,
        want.expected,
        want.offset,
    )
    assert dict(got.labels) == dict(want.labels)


@pytest.mark.parametrize("req", REQUESTS, ids=range(len(REQUESTS)))
def test_decodes_as_protobuf_does(req: content_pb2.WriteContentRequest) -> None:
    _same(req.SerializeToString())


def test_data_is_a_view_of_the_message_not_a_copy() -> None:
    raw = REQUESTS[1].SerializeToString()
    got = decode_write_request(raw)
    assert isinstance(got.data, memoryview)
    assert got.data.obj is raw
    assert not got.msg.data  # protobuf never saw it


def test_fields_in_any_order_and_unknown_ones() -> None:
    # Labels before the data, an unknown varint and an unknown fixed64 field after it.
    label = content_pb2.WriteContentRequest(labels={"x": "y"}).SerializeToString()
    data = content_pb2.WriteContentRequest(data=b"payload").SerializeToString()
    head = content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref="r").SerializeToString()
    unknown = bytes([9 << 3 | 0, 0x96, 0x01, 10 << 3 | 1]) + bytes(8)
    _same(label + head + data + unknown)


def test_a_repeated_data_field_keeps_the_last_one() -> None:
    first = content_pb2.WriteContentRequest(data=b"first").SerializeToString()
    second = content_pb2.WriteContentRequest(ref="r", data=b"second").SerializeToString()
    raw = first + second
    _same(raw)
    assert bytes(decode_write_request(raw).data) == b"second"


@pytest.mark.parametrize(
    "raw",
    [
        bytes([6 << 3 | 2, 10]) + b"short",  # data longer than the message
        bytes([6 << 3 | 2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
        bytes([2 << 3 | 2, 2]) + b"\xff\xfe" + bytes([6 << 3 | 2, 1]) + b"d",  # bad UTF-8 ref
        bytes([1 << 3 | 3]),  # a group start
        bytes([6 << 3 | 2]),  # a key with no length
    ],
    ids=["overlong", "huge-varint", "bad-utf8", "group", "no-length"],
)
def test_malformed_messages_fail_as_protobuf_fails(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        content_pb2.WriteContentRequest.FromString(raw)
    with pytest.raises(DecodeError):
        decode_write_request(raw)


@pytest.mark.parametrize("make", [Server, lambda: grpc.aio.server()], ids=["ours", "grpcio"])
def test_the_content_service_serves_write_with_the_decoder(make: Any) -> None:
    # The generated registration names FromString; ours must replace it on either server
    # (registered methods win over generic handlers).
    seen: list[Any] = []

    class Spy:
        def __init__(self, server: Any) -> None:
            self.server = server

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.server.add_generic_rpc_handlers(handlers)

        def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
            seen.append((service, handlers.get("Write")))
            self.server.add_registered_method_handlers(service, handlers)

    async def main() -> None:
        server = make()
        ContentService(None).register(Spy(server))  # type: ignore[arg-type]  # no calls
        if isinstance(server, Server):
            rpc = server.lookup(f"/{seen[-1][0]}/Write")
            assert rpc is not None
            assert rpc[2] is decode_write_request

    asyncio.run(main())
    service, write = seen[-1]
    assert service == "containerd.services.content.v1.Content"
    assert write.request_deserializer is decode_write_request
