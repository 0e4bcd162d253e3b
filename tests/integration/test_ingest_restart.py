"""Content ingest against the real daemon: surviving a SIGKILL mid-write (reliability R5)
and the Write protocol's offset and commit codes (R7), over the generated stubs."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import grpc
import pytest

from pycontainerd.api.services.content.v1 import content_pb2
from tests.support.content_client import (
    MiB,
    WriteStream,
    code_of,
    content_info,
    content_stub,
    create_lease,
    delete_lease,
    ingest,
    read_all,
    sha256,
)
from tests.support.daemon import metadata

if TYPE_CHECKING:
    from tests.support.daemon import Daemon

SIZE = 64 * MiB


@pytest.fixture(scope="module")
def big_blob() -> bytes:
    return os.urandom(SIZE)


@pytest.mark.parametrize("in_flight", [False, True], ids=["between-writes", "write-in-flight"])
def test_ingest_resumes_after_sigkill(
    fresh_daemon: Daemon, big_blob: bytes, in_flight: bool
) -> None:
    ns, ref, lease = "ingest", "big-blob-ref", "ingest-lease"
    digest = sha256(big_blob)
    acked = 0
    with fresh_daemon.channel() as ch:
        # As a real client does: without a lease, the committed blob would be garbage for
        # the collection that runs at start-up.
        create_lease(ch, ns, lease)
        w = WriteStream(ch, ns, lease)
        first = w.stat(ref, SIZE)
        assert first.offset == 0 and first.total == SIZE
        for off in range(0, SIZE // 2, MiB):
            resp = w.write(off, big_blob[off : off + MiB])
            acked = off + MiB
            assert resp.offset == acked
        sent = acked
        if in_flight:
            # One more chunk goes out, and the daemon dies whatever it has done with it.
            w.put(
                content_pb2.WriteContentRequest(
                    action=content_pb2.WRITE, offset=sent, data=big_blob[sent : sent + MiB]
                )
            )
            sent += MiB
        fresh_daemon.kill9()
        with pytest.raises(grpc.RpcError):
            w.drain()
    fresh_daemon.start()

    with fresh_daemon.channel() as ch:
        stub = content_stub(ch)
        # Nothing is visible under the digest before the commit.
        assert code_of(content_info, ch, ns, digest) == grpc.StatusCode.NOT_FOUND
        status = stub.Status(content_pb2.StatusRequest(ref=ref), metadata=metadata(ns)).status
        assert status.ref == ref and status.total == SIZE
        listed = stub.ListStatuses(content_pb2.ListStatusesRequest(), metadata=metadata(ns))
        assert [s.ref for s in listed.statuses] == [ref]

        w = WriteStream(ch, ns, lease)
        resp = w.stat(ref)
        offset = resp.offset
        assert offset == status.offset
        # Never more than the client sent (between writes: than the daemon acknowledged);
        # some of it survives, and the digest so far is that of exactly those bytes.
        assert 0 < offset <= (sent if in_flight else acked), (acked, offset, sent)
        assert resp.digest == sha256(big_blob[:offset])
        for off in range(offset, SIZE, MiB):
            w.write(off, big_blob[off : off + MiB])
        done = w.commit(SIZE, SIZE, digest)
        assert done.digest == digest and done.offset == SIZE
        w.close()

        assert content_info(ch, ns, digest).size == SIZE
        h = hashlib.sha256()
        for chunk in read_all(ch, ns, digest):
            h.update(chunk)
        assert "sha256:" + h.hexdigest() == digest
        listed = stub.ListStatuses(content_pb2.ListStatusesRequest(), metadata=metadata(ns))
        assert not listed.statuses
        # The lease held the blob; without it the blob is garbage.
        delete_lease(ch, ns, lease, sync=True)
        assert code_of(content_info, ch, ns, digest) == grpc.StatusCode.NOT_FOUND


def test_write_protocol_codes(daemon: Daemon) -> None:
    ns, lease = "ingest-codes", "codes-lease"
    data = b"0123456789" * 1000
    digest = sha256(data)
    with daemon.channel() as ch:
        stub = content_stub(ch)
        create_lease(ch, ns, lease)
        # The first message must carry a ref.
        w = WriteStream(ch, ns, lease)
        assert code_of(w.stat) == grpc.StatusCode.INVALID_ARGUMENT
        w.close()

        w = WriteStream(ch, ns, lease)
        w.stat("codes-ref", len(data))
        assert w.write(0, data[:4000]).offset == 4000
        # A write past the current offset is out of range.
        assert code_of(w.write, 5000, data[5000:6000]) == grpc.StatusCode.OUT_OF_RANGE
        w.close()

        # Offset 0 over existing data restarts the ingest from scratch.
        w = WriteStream(ch, ns, lease)
        assert w.stat("codes-ref").offset == 4000
        assert w.write(0, data[:100]).offset == 100
        assert w.stat().offset == 100
        assert w.write(100, data[100:3000]).offset == 3000
        # A COMMIT whose total disagrees with the bytes is a failed precondition...
        assert code_of(w.commit, len(data), 3000, digest) == grpc.StatusCode.FAILED_PRECONDITION
        w.close()
        assert code_of(content_info, ch, ns, digest) == grpc.StatusCode.NOT_FOUND
        # ... and the data stays for a resume at the same offset.
        w = WriteStream(ch, ns, lease)
        assert w.stat("codes-ref").offset == 3000
        w.write(3000, data[3000:])
        wrong = sha256(b"something else")
        assert code_of(w.commit, len(data), len(data), wrong) == grpc.StatusCode.FAILED_PRECONDITION
        w.close()
        w = WriteStream(ch, ns, lease)
        assert w.stat("codes-ref").offset == len(data)
        assert w.commit(len(data), len(data), digest).digest == digest
        w.close()

        # The same bytes again under another ref: the blob exists already.
        w = WriteStream(ch, ns, lease)
        resp = w.stat("codes-ref-2", len(data))
        assert resp.offset == 0
        req = content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT, offset=0, data=data, total=len(data), expected=digest
        )
        assert code_of(w.send, req) == grpc.StatusCode.ALREADY_EXISTS
        w.close()
        assert (
            code_of(ingest, ch, ns, "codes-ref-3", data, lease=lease)
            == grpc.StatusCode.ALREADY_EXISTS
        )

        assert (
            code_of(
                stub.Abort, content_pb2.AbortRequest(ref="never-started"), metadata=metadata(ns)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        read = content_pb2.ReadContentRequest(digest=digest, offset=len(data) + 1)
        assert (
            code_of(lambda: list(stub.Read(read, metadata=metadata(ns))))
            == grpc.StatusCode.OUT_OF_RANGE
        )
        assert b"".join(read_all(ch, ns, digest)) == data

        # Abort of a real ingest removes it: its offset starts over.
        w = WriteStream(ch, ns, lease)
        w.stat("aborted-ref", 10)
        w.write(0, b"12345")
        w.close()
        stub.Abort(content_pb2.AbortRequest(ref="aborted-ref"), metadata=metadata(ns))
        assert (
            code_of(
                stub.Status, content_pb2.StatusRequest(ref="aborted-ref"), metadata=metadata(ns)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        delete_lease(ch, ns, lease, sync=True)
        assert code_of(content_info, ch, ns, digest) == grpc.StatusCode.NOT_FOUND
