"""Content service helpers: info, streamed and bounded reads, label updates, and
resumable ingests over the bidirectional ``Content.Write`` stream.

An ingest is keyed by a ref. ``Content.Write`` answers a first STAT with the offset the
daemon already holds for that ref (a previous, interrupted ingest), so ``ingest`` asks
its data source to start there; the daemon checks size and digest at COMMIT, and a
mismatch aborts the ref so the next attempt starts from zero instead of appending to
corrupt bytes.
"""

from __future__ import annotations

import collections
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc.aio
from google.protobuf import field_mask_pb2

from pycontainerd.api.services.content.v1 import content_pb2
from pycontainerd.client._client import rpc_errors, timestamp_to_datetime
from pycontainerd.errdefs import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PycdError,
)

if TYPE_CHECKING:
    from pycontainerd.client._client import RawClient

__all__ = ["MAX_JSON", "ContentInfo", "ContentStore", "IngestSource"]

CHUNK = 1 << 20
# WRITE requests sent ahead of their answers (each at most CHUNK bytes).
WINDOW = 8
# Manifests, indexes and configs are read whole; bound them (CVE-2023-25153 style bombs).
MAX_JSON = 20 << 20

# Given the offset the daemon already has, yield the remaining bytes from there.
IngestSource = Callable[[int], AsyncIterable[bytes]]


@dataclass(frozen=True, slots=True)
class ContentInfo:
    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


def _info(pb: content_pb2.Info) -> ContentInfo:
    return ContentInfo(
        pb.digest,
        pb.size,
        dict(pb.labels),
        timestamp_to_datetime(pb.created_at),
        timestamp_to_datetime(pb.updated_at),
    )


class ContentStore:
    """The Content service of one client (namespace and lease come from the client)."""

    def __init__(self, client: RawClient) -> None:
        self._c = client
        self._stub = client.content_stub

    async def info(self, digest: str) -> ContentInfo:
        resp = await self._c.call(self._stub.Info, content_pb2.InfoRequest(digest=digest))
        return _info(resp.info)

    async def exists(self, digest: str) -> bool:
        try:
            await self.info(digest)
        except NotFound:
            return False
        return True

    async def list_info(self, *filters: str) -> list[ContentInfo]:
        out: list[ContentInfo] = []
        req = content_pb2.ListContentRequest(filters=filters)
        async for resp in self._c.stream(self._stub.List, req):
            out.extend(_info(i) for i in resp.info)
        return out

    async def delete(self, digest: str) -> None:
        await self._c.call(self._stub.Delete, content_pb2.DeleteContentRequest(digest=digest))

    async def update_labels(self, digest: str, labels: Mapping[str, str]) -> ContentInfo:
        """Set (or, with an empty value, remove) the given labels, leaving others alone."""
        req = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels={k: v for k, v in labels.items() if v}),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        resp = await self._c.call(self._stub.Update, req)
        return _info(resp.info)

    async def read(self, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        """Stream ``size`` bytes (0: to the end) of a blob from ``offset``."""
        req = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        async for resp in self._c.stream(self._stub.Read, req):
            yield resp.data

    async def read_all(self, digest: str, limit: int = MAX_JSON) -> bytes:
        """The whole blob; InvalidArgument when it is larger than ``limit``."""
        info = await self.info(digest)
        if info.size > limit:
            raise InvalidArgument(f"blob {digest} is {info.size} bytes, over the {limit} limit")
        buf = bytearray()
        async for chunk in self.read(digest):
            buf += chunk
            if len(buf) > limit:
                raise InvalidArgument(f"blob {digest} is over the {limit} limit")
        return bytes(buf)

    async def read_json(self, digest: str, limit: int = MAX_JSON) -> Any:
        data = await self.read_all(digest, limit)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"blob {digest} is not JSON: {exc}") from exc

    async def status(self, ref: str) -> content_pb2.Status:
        resp = await self._c.call(self._stub.Status, content_pb2.StatusRequest(ref=ref))
        status: content_pb2.Status = resp.status
        return status

    async def list_statuses(self, *filters: str) -> list[content_pb2.Status]:
        req = content_pb2.ListStatusesRequest(filters=filters)
        resp = await self._c.call(self._stub.ListStatuses, req)
        return list(resp.statuses)

    async def abort(self, ref: str) -> None:
        await self._c.call(self._stub.Abort, content_pb2.AbortRequest(ref=ref))

    async def ingest(
        self,
        ref: str,
        source: IngestSource | bytes,
        *,
        expected: str,
        size: int,
        labels: Mapping[str, str] | None = None,
    ) -> bool:
        """Write a blob under ``ref``, resuming where a previous attempt stopped.

        Returns False when the blob was already present (nothing written), True when it
        was committed. FailedPrecondition when the bytes do not hash to ``expected`` (the
        partial ingest is aborted); errors of ``source`` propagate with the partial
        ingest kept, so a later call resumes it.
        """
        # No Info pre-check: opening the writer with ``expected`` is what adds an existing
        # blob to the caller's lease (the daemon answers AlreadyExists after doing so).
        if isinstance(source, bytes):
            data = source

            async def from_bytes(offset: int) -> AsyncIterator[bytes]:
                for i in range(offset, len(data), CHUNK):
                    yield data[i : i + CHUNK]

            source = from_bytes
        call = self._stub.Write(metadata=self._c.metadata())
        try:
            with rpc_errors():
                return await self._write(call, ref, source, expected, size, labels or {})
        except AlreadyExists:
            return False
        except (FailedPrecondition, InvalidArgument):
            with contextlib.suppress(PycdError):
                await self.abort(ref)
            raise
        finally:
            call.cancel()

    async def _write(
        self,
        call: Any,
        ref: str,
        source: IngestSource,
        expected: str,
        size: int,
        labels: Mapping[str, str],
    ) -> bool:
        await call.write(
            content_pb2.WriteContentRequest(
                action=content_pb2.STAT, ref=ref, total=size, expected=expected
            )
        )
        resp = await call.read()
        offset = resp.offset
        if offset > size:
            # A stale ingest longer than the blob: start over.
            await call.done_writing()
            await self.abort(ref)
            return await self.ingest(ref, source, expected=expected, size=size, labels=labels)
        # The daemon may already hold every byte (an ingest that died before COMMIT, or a
        # blob shared from another namespace): then only the commit is left to do.
        chunks = source(offset) if offset < size else _nothing()
        # Up to WINDOW writes are in flight: waiting for each answer before sending the
        # next chunk left both ends idle half the time. The daemon answers every WRITE in
        # order with the offset after it, which must be where we said the chunk ends.
        in_flight: collections.deque[int] = collections.deque()
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                if offset + len(chunk) > size:
                    raise FailedPrecondition(
                        f"{ref}: source sent more than the expected {size} bytes"
                    )
                await call.write(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, offset=offset, data=chunk
                    )
                )
                offset += len(chunk)
                in_flight.append(offset)
                if len(in_flight) >= WINDOW:
                    await _acknowledged(call, ref, in_flight.popleft())
        finally:
            # Also when the source fails: what was sent is stored, for a resume.
            while in_flight:
                await _acknowledged(call, ref, in_flight.popleft())
        if offset != size:
            raise DataLoss(f"{ref}: source ended at {offset} of {size} bytes")
        await call.write(
            content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT,
                offset=offset,
                total=size,
                expected=expected,
                labels=dict(labels),
            )
        )
        await call.read()
        await call.done_writing()
        return True


async def _acknowledged(call: Any, ref: str, end: int) -> None:
    resp = await call.read()
    if resp is grpc.aio.EOF:
        raise DataLoss(f"{ref}: the write stream ended early")
    if resp.offset != end:
        raise DataLoss(f"{ref}: daemon at offset {resp.offset} after a write ending at {end}")


async def _nothing() -> AsyncIterator[bytes]:
    empty: tuple[bytes, ...] = ()
    for chunk in empty:
        yield chunk
