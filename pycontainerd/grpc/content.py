"""The ``containerd.services.content.v1.Content`` servicer over the namespaced content store.

Thin: it converts protobuf to domain values and back and drives the store. Two streaming
methods carry protocol rules of their own, as containerd's ``contentserver`` does:

- ``Read`` sends ``{offset, data}`` chunks of at most 1 MiB over the requested section
  (negative offset = 0, size 0 = to the end, offset past the end = OutOfRange); each chunk
  is one positional read in a worker thread, and a client cancel just stops the loop.
- ``Write`` is bidirectional: the first message must name a ``ref``; each message is
  answered with the writer's offset (and digest after STAT/WRITE/COMMIT); a message whose
  ``expected`` digest is already in the namespace aborts the ingest with AlreadyExists;
  COMMIT ends the stream. The response object carries fields over from earlier answers
  (containerd reuses one message), so a WRITE answer still shows the ``total`` a STAT set.

Write's requests are decoded by ``decode_write_request``: the ``data`` field (1 MiB per
message from ctr) stays a view of the received message instead of being copied twice, once
by protobuf's parse and once more by reading the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import grpc.aio
from google.protobuf import empty_pb2, timestamp_pb2

from pycontainerd.api.services.content.v1 import content_pb2, content_pb2_grpc
from pycontainerd.content.metadata import SMALL_BLOB
from pycontainerd.content.store import Info, read_section
from pycontainerd.errdefs import AlreadyExists, InvalidArgument, NotFound

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from google.protobuf.internal.containers import ScalarMap

    from pycontainerd.content.metadata import NamespacedContentStore
    from pycontainerd.content.store import Status
    from pycontainerd.transfer.staging import Speculation, Stager

__all__ = ["ContentService", "WriteRequest", "decode_write_request"]

log = logging.getLogger(__name__)

Context = Any  # grpc.aio.ServicerContext; the stubs' generics add nothing here

READ_CHUNK = 1 << 20
LIST_BATCH = 100

_SERVICE = "containerd.services.content.v1.Content"
_STAT = content_pb2.STAT
_WRITE = content_pb2.WRITE
_COMMIT = content_pb2.COMMIT

# Enough of a blob's first bytes to tell a layer (a tar header's magic is at 257).
_HEAD = 512

_DATA_FIELD = 6  # WriteContentRequest.data
_LENGTH_DELIMITED = 2


class WriteRequest:
    """A ``WriteContentRequest`` whose ``data`` may be a view of the received bytes."""

    __slots__ = ("data", "msg")

    def __init__(self, msg: content_pb2.WriteContentRequest, data: bytes | memoryview) -> None:
        self.msg = msg
        self.data = data

    @property
    def action(self) -> content_pb2.WriteAction.ValueType:
        return self.msg.action

    @property
    def ref(self) -> str:
        return self.msg.ref

    @property
    def total(self) -> int:
        return self.msg.total

    @property
    def expected(self) -> str:
        return self.msg.expected

    @property
    def offset(self) -> int:
        return self.msg.offset

    @property
    def labels(self) -> ScalarMap[str, str]:
        return self.msg.labels


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint too long")


def _data_span(raw: bytes) -> tuple[int, int, int] | None:
    """(start of its key, start, end) of the one top-level ``data`` field; None when
    there is none or more than one; ValueError when ``raw`` is not well formed."""
    pos, n = 0, len(raw)
    found: tuple[int, int, int] | None = None
    seen = 0
    while pos < n:
        start = pos
        key, pos = _varint(raw, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(raw, pos)
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(raw, pos)
            if key >> 3 == _DATA_FIELD:
                found = (start, pos, pos + length)
                seen += 1
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > n:
            raise ValueError("field past the end")
    return found if seen == 1 else None


def decode_write_request(raw: bytes) -> WriteRequest:
    """Content.Write's request deserializer: protobuf parses every field but ``data``,
    which is handed on as a view of ``raw``. Anything unusual (no data, malformed bytes,
    a repeated field) goes to protobuf whole, so errors are protobuf's own."""
    raw = bytes(raw)  # immutable, so the view stays valid (a no-op for bytes)
    try:
        span = _data_span(raw)
    except ValueError:
        span = None
    if span is None:
        msg = content_pb2.WriteContentRequest.FromString(raw)
        return WriteRequest(msg, msg.data)
    key, start, end = span
    msg = content_pb2.WriteContentRequest.FromString(raw[:key] + raw[end:])
    return WriteRequest(msg, memoryview(raw)[start:end])


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _info_to_pb(info: Info) -> content_pb2.Info:
    return content_pb2.Info(
        digest=info.digest,
        size=info.size,
        created_at=_ts(info.created_at),
        updated_at=_ts(info.updated_at),
        labels=info.labels,
    )


def _status_to_pb(st: Status) -> content_pb2.Status:
    return content_pb2.Status(
        started_at=_ts(st.started_at),
        updated_at=_ts(st.updated_at),
        ref=st.ref,
        offset=st.offset,
        total=st.total,
        expected=st.expected,
    )


class ContentService(content_pb2_grpc.ContentServicer):
    """gRPC plugin instance: ``register(server)`` adds the Content service."""

    def __init__(self, store: NamespacedContentStore, stager: Stager | None = None) -> None:
        self.store = store
        # Unpacks blobs that look like layers while they are written (see Write).
        self.stager = stager

    def register(self, server: grpc.aio.Server) -> None:
        content_pb2_grpc.add_ContentServicer_to_server(self, server)
        # Write again, with the request decoder that leaves data uncopied: registering a
        # method anew replaces the generated entry.
        write = grpc.stream_stream_rpc_method_handler(
            self.Write,
            request_deserializer=decode_write_request,
            response_serializer=content_pb2.WriteContentResponse.SerializeToString,
        )
        server.add_registered_method_handlers(_SERVICE, {"Write": write})

    async def Info(
        self, request: content_pb2.InfoRequest, context: Context
    ) -> content_pb2.InfoResponse:
        return content_pb2.InfoResponse(info=_info_to_pb(await self.store.info(request.digest)))

    async def Update(
        self, request: content_pb2.UpdateRequest, context: Context
    ) -> content_pb2.UpdateResponse:
        info = Info(digest=request.info.digest, size=0, labels=dict(request.info.labels))
        updated = await self.store.update(info, list(request.update_mask.paths))
        return content_pb2.UpdateResponse(info=_info_to_pb(updated))

    async def List(
        self, request: content_pb2.ListContentRequest, context: Context
    ) -> AsyncIterator[content_pb2.ListContentResponse]:
        infos = await self.store.list_content(list(request.filters))
        for i in range(0, len(infos), LIST_BATCH):
            batch = [_info_to_pb(info) for info in infos[i : i + LIST_BATCH]]
            yield content_pb2.ListContentResponse(info=batch)

    async def Delete(
        self, request: content_pb2.DeleteContentRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.store.delete(request.digest)
        return empty_pb2.Empty()

    async def Read(
        self, request: content_pb2.ReadContentRequest, context: Context
    ) -> AsyncIterator[content_pb2.ReadContentResponse]:
        info = await self.store.info(request.digest)
        if info.size <= SMALL_BLOB:
            blob = await self.store.read_small(request.digest, info.size)
            start, length = read_section(len(blob), request.offset, request.size)
            if length:
                yield content_pb2.ReadContentResponse(
                    offset=start, data=blob[start : start + length]
                )
            return
        reader = await self.store.open_reader(request.digest)
        try:
            start, length = read_section(reader.size, request.offset, request.size)
            pos, end = start, start + length
            while pos < end:
                data = await asyncio.to_thread(reader.read_at, pos, min(READ_CHUNK, end - pos))
                if not data:
                    break  # the file is shorter than it was at open: nothing more to send
                yield content_pb2.ReadContentResponse(offset=pos, data=data)
                pos += len(data)
        finally:
            # Also runs when the client cancels mid-stream (the generator is closed).
            reader.close()

    async def Status(
        self, request: content_pb2.StatusRequest, context: Context
    ) -> content_pb2.StatusResponse:
        st = await self.store.status(request.ref)
        return content_pb2.StatusResponse(status=_status_to_pb(st))

    async def ListStatuses(
        self, request: content_pb2.ListStatusesRequest, context: Context
    ) -> content_pb2.ListStatusesResponse:
        statuses = await self.store.list_statuses(list(request.filters))
        return content_pb2.ListStatusesResponse(statuses=[_status_to_pb(s) for s in statuses])

    async def Abort(self, request: content_pb2.AbortRequest, context: Context) -> empty_pb2.Empty:
        await self.store.abort(request.ref)
        return empty_pb2.Empty()

    async def Write(  # type: ignore[override]  # requests come from decode_write_request
        self, request_iterator: AsyncIterator[WriteRequest], context: Context
    ) -> AsyncIterator[content_pb2.WriteContentResponse]:
        requests = aiter(request_iterator)
        req = await anext(requests, None)
        if req is None:
            return
        ref = req.ref
        if not ref:
            raise InvalidArgument("first message must have a reference")
        total = req.total
        expected = req.expected
        writer = await self.store.writer(ref, total=total, expected=expected)
        msg = content_pb2.WriteContentResponse()
        # A blob written from its first byte may be a layer the client applies next
        # (ctr images import): it is unpacked on the side, never holding the write up.
        spec: Speculation | None = None
        fresh = writer.fresh
        try:
            while True:
                msg.action = req.action
                msg.offset = writer.status().offset
                if req.expected:
                    expected = req.expected
                    if await self.store.exists(expected):
                        await writer.close()
                        with contextlib.suppress(NotFound):
                            await self.store.abort(ref)
                        raise AlreadyExists(f"blob with expected digest {expected} exists")
                if req.total > 0:
                    total = req.total
                if req.action == _STAT:
                    st = writer.status()
                    msg.digest = writer.digest()
                    msg.started_at.CopyFrom(_ts(st.started_at))
                    msg.updated_at.CopyFrom(_ts(st.updated_at))
                    msg.total = total
                elif req.action in (_WRITE, _COMMIT):
                    data = req.data
                    if data and self.stager is not None:
                        if spec is None:
                            if fresh and req.offset == 0:
                                spec = await self.stager.speculate(
                                    bytes(data[:_HEAD]), writer.data_path, total
                                )
                        elif req.offset != writer.status().offset:
                            spec.cancel()  # a restart from 0 (or a bad offset)
                    fresh = False
                    msg.offset = (await writer.write_at(req.offset, data)).offset
                    if req.action == _COMMIT:
                        digest = await writer.commit(total, expected, dict(req.labels))
                        if spec is not None:
                            spec.finish(digest, msg.offset)
                    msg.digest = writer.digest()
                else:
                    raise InvalidArgument(f"unknown write action {req.action}")
                out = content_pb2.WriteContentResponse()
                out.CopyFrom(msg)
                yield out
                if req.action == _COMMIT:
                    return
                req = await anext(requests, None)
                if req is None:
                    return
        finally:
            if spec is not None:
                spec.cancel()  # (a no-op once finished)
            # Runs on client cancel too: the ref is unlocked and the data kept for a resume.
            await writer.close()
