"""Drive the daemon's content and lease services over a real channel, message by message.

``WriteStream`` runs one ``Content.Write`` stream in lock-step (send a request, wait for
its answer), which is what a test needs to know exactly how many bytes the daemon
acknowledged before something goes wrong; ``put`` sends without waiting. ``ingest``,
``read_all``, ``code_of`` and the lease helpers are the small calls around it.
"""

from __future__ import annotations

import hashlib
import queue
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import field_mask_pb2

from pycontainerd.api.services.content.v1 import content_pb2, content_pb2_grpc
from pycontainerd.api.services.leases.v1 import leases_pb2, leases_pb2_grpc
from tests.support.daemon import metadata

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

__all__ = [
    "MiB",
    "WriteStream",
    "add_lease_resource",
    "code_of",
    "content_info",
    "content_stub",
    "create_lease",
    "delete_lease",
    "ingest",
    "lease_ids",
    "read_all",
    "set_content_labels",
    "sha256",
]

MiB = 1 << 20
STAT = content_pb2.STAT
WRITE = content_pb2.WRITE
COMMIT = content_pb2.COMMIT


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def code_of(fn: Callable[..., object], *args: object, **kw: object) -> grpc.StatusCode:
    """Call `fn` expecting an RpcError; return its status code."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code()


def content_stub(channel: grpc.Channel) -> content_pb2_grpc.ContentStub:
    return content_pb2_grpc.ContentStub(channel)


class WriteStream:
    """One Content.Write stream; `send` waits for the answer to each request."""

    _END = object()

    def __init__(
        self,
        channel: grpc.Channel,
        namespace: str,
        lease: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        self._requests: queue.Queue[object] = queue.Queue()
        # The deadline only turns a hung daemon into a failure instead of a hung test run.
        self._call = content_stub(channel).Write(
            iter(self._requests.get, self._END),  # type: ignore[arg-type]
            metadata=metadata(namespace, lease),
            timeout=timeout,
        )

    def put(self, req: content_pb2.WriteContentRequest) -> None:
        """Send without waiting for the answer."""
        self._requests.put(req)

    def recv(self) -> content_pb2.WriteContentResponse:
        return next(self._call)

    def drain(self) -> None:
        """Read answers until the stream ends (raises the RpcError if it fails)."""
        for _ in self._call:
            pass

    def send(self, req: content_pb2.WriteContentRequest) -> content_pb2.WriteContentResponse:
        self.put(req)
        return self.recv()

    def stat(self, ref: str = "", total: int = 0) -> content_pb2.WriteContentResponse:
        return self.send(content_pb2.WriteContentRequest(action=STAT, ref=ref, total=total))

    def write(self, offset: int, data: bytes) -> content_pb2.WriteContentResponse:
        return self.send(content_pb2.WriteContentRequest(action=WRITE, offset=offset, data=data))

    def commit(
        self,
        total: int,
        offset: int,
        expected: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> content_pb2.WriteContentResponse:
        return self.send(
            content_pb2.WriteContentRequest(
                action=COMMIT, total=total, offset=offset, expected=expected, labels=labels
            )
        )

    def close(self) -> None:
        """Half-close, then drop the call (the daemon keeps the data for a resume)."""
        self._requests.put(self._END)
        self._call.cancel()


def ingest(
    channel: grpc.Channel,
    namespace: str,
    ref: str,
    data: bytes,
    *,
    lease: str | None = None,
    labels: Mapping[str, str] | None = None,
    chunk: int = MiB,
) -> str:
    """Write `data` as one blob and commit it; returns its digest."""
    w = WriteStream(channel, namespace, lease)
    try:
        w.stat(ref, len(data))
        for off in range(0, len(data), chunk):
            w.write(off, data[off : off + chunk])
        digest = sha256(data)
        resp = w.commit(len(data), len(data), digest, labels)
        assert resp.digest == digest
        return digest
    finally:
        w.close()


def content_info(channel: grpc.Channel, namespace: str, digest: str) -> content_pb2.Info:
    resp = content_stub(channel).Info(
        content_pb2.InfoRequest(digest=digest), metadata=metadata(namespace)
    )
    return resp.info


def read_all(channel: grpc.Channel, namespace: str, digest: str) -> Iterator[bytes]:
    """The blob's bytes, chunk by chunk, checking that the offsets follow each other."""
    pos = 0
    for resp in content_stub(channel).Read(
        content_pb2.ReadContentRequest(digest=digest), metadata=metadata(namespace)
    ):
        assert resp.offset == pos
        pos += len(resp.data)
        yield resp.data


def set_content_labels(
    channel: grpc.Channel, namespace: str, digest: str, labels: Mapping[str, str]
) -> None:
    """Set (or with an empty value, remove) exactly the given label keys."""
    content_stub(channel).Update(
        content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels={k: v for k, v in labels.items() if v}),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        ),
        metadata=metadata(namespace),
    )


def create_lease(
    channel: grpc.Channel, namespace: str, lease_id: str, labels: Mapping[str, str] | None = None
) -> None:
    leases_pb2_grpc.LeasesStub(channel).Create(
        leases_pb2.CreateRequest(id=lease_id, labels=labels), metadata=metadata(namespace)
    )


def delete_lease(channel: grpc.Channel, namespace: str, lease_id: str, sync: bool = True) -> None:
    leases_pb2_grpc.LeasesStub(channel).Delete(
        leases_pb2.DeleteRequest(id=lease_id, sync=sync), metadata=metadata(namespace)
    )


def add_lease_resource(
    channel: grpc.Channel, namespace: str, lease_id: str, kind: str, ident: str
) -> None:
    """`kind` is "content", "ingests" or "snapshots/<snapshotter>"."""
    leases_pb2_grpc.LeasesStub(channel).AddResource(
        leases_pb2.AddResourceRequest(
            id=lease_id, resource=leases_pb2.Resource(id=ident, type=kind)
        ),
        metadata=metadata(namespace),
    )


def lease_ids(channel: grpc.Channel, namespace: str) -> set[str]:
    resp = leases_pb2_grpc.LeasesStub(channel).List(
        leases_pb2.ListRequest(), metadata=metadata(namespace)
    )
    return {lease.id for lease in resp.leases}
