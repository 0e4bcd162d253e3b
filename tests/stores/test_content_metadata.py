"""The namespaced content store over real sqlite and real files: isolation, sharing,
labels, leases, ingests, events."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.events import content_pb2 as content_events
from pycontainerd.content.local import LocalStore
from pycontainerd.content.metadata import NamespacedContentStore
from pycontainerd.content.store import Info
from pycontainerd.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.namespaces import current_lease, current_namespace

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from google.protobuf.message import Message


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Message, str | None]] = []

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        self.events.append((topic, event, namespace))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def use(ns: str | None, lease: str | None = None) -> None:
    current_namespace.set(ns)
    current_lease.set(lease)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MetadataDB]:
    d = MetadataDB(tmp_path / "meta.db", synchronous="OFF")
    await d.open()
    yield d
    await d.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def cs(tmp_path: Path, db: MetadataDB, recorder: Recorder) -> NamespacedContentStore:
    return NamespacedContentStore(LocalStore(tmp_path / "content"), db, recorder)


async def put(
    cs: NamespacedContentStore, data: bytes, ref: str = "ref", labels: dict[str, str] | None = None
) -> str:
    w = await cs.writer(ref, total=len(data), expected=sha(data))
    try:
        await w.write_at(0, data)
        return await w.commit(len(data), sha(data), labels)
    finally:
        await w.close()


async def add_lease(db: MetadataDB, ns: str, lease: str) -> None:
    await db.update(
        lambda c: c.execute(
            "INSERT INTO leases(namespace, id, created_at) VALUES (?,?,?)",
            (ns, lease, time.time_ns()),
        )
    )


async def resources(db: MetadataDB, ns: str, lease: str) -> set[tuple[str, str]]:
    rows = await db.view(
        lambda c: c.execute(
            "SELECT type, id FROM lease_resources WHERE namespace=? AND lease=?", (ns, lease)
        ).fetchall()
    )
    return {(r[0], r[1]) for r in rows}


async def test_namespace_required(cs: NamespacedContentStore) -> None:
    use(None)
    with pytest.raises(FailedPrecondition, match="namespace is required"):
        await cs.info(sha(b"x"))
    with pytest.raises(FailedPrecondition):
        await cs.writer("r")
    use("bad/name")
    with pytest.raises(InvalidArgument):
        await cs.list_content()


async def test_isolation_between_namespaces(cs: NamespacedContentStore) -> None:
    use("a")
    dgst = await put(cs, b"only in a", labels={"k": "v"})
    info = await cs.info(dgst)
    assert (info.size, info.labels) == (9, {"k": "v"})
    assert await cs.read_all(dgst) == b"only in a"
    use("b")
    with pytest.raises(NotFound):
        await cs.info(dgst)
    with pytest.raises(NotFound):
        await cs.open_reader(dgst)
    with pytest.raises(NotFound):
        await cs.delete(dgst)
    assert await cs.list_content() == []


async def test_shared_blob_needs_no_bytes(cs: NamespacedContentStore) -> None:
    data = b"shared layer" * 1000
    use("a")
    dgst = await put(cs, data)
    ino = cs.backend.blob_path(dgst).stat().st_ino
    use("b")
    w = await cs.writer("pull", total=len(data), expected=dgst)
    st = w.status()
    assert (st.offset, st.total, st.expected) == (len(data), len(data), dgst)
    assert w.digest() == dgst
    assert (await cs.status("pull")).offset == len(data)
    await w.write_at(len(data), b"")  # a COMMIT message with offset == size, no data
    assert await w.commit(len(data), dgst, {"in": "b"}) == dgst
    await w.close()
    assert (await cs.info(dgst)).labels == {"in": "b"}
    assert cs.backend.blob_path(dgst).stat().st_ino == ino, "the blob was not rewritten"
    assert await cs.list_statuses() == []


async def test_shared_size_mismatch_uploads(cs: NamespacedContentStore) -> None:
    use("a")
    dgst = await put(cs, b"abc")
    use("b")
    w = await cs.writer("r", total=4, expected=dgst)
    assert w.status().offset == 0
    await w.close()


async def test_shared_writer_restarted_at_zero(cs: NamespacedContentStore) -> None:
    use("a")
    dgst = await put(cs, b"abc")
    use("b")
    w = await cs.writer("r", expected=dgst)
    assert (await w.write_at(0, b"xyz")).offset == 3
    assert await w.commit(3) == sha(b"xyz")
    await w.close()


async def test_shared_writer_appending_copies_first(cs: NamespacedContentStore) -> None:
    use("a")
    dgst = await put(cs, b"abc")
    use("b")
    w = await cs.writer("r", expected=dgst)
    with pytest.raises(OutOfRange):
        await w.write_at(7, b"d")
    assert (await w.write_at(3, b"d")).offset == 4
    assert await w.commit(4) == sha(b"abcd")
    await w.close()
    assert await cs.read_all(sha(b"abcd")) == b"abcd"


async def test_same_ref_in_two_namespaces(cs: NamespacedContentStore) -> None:
    use("a")
    wa = await cs.writer("same")
    use("b")
    wb = await cs.writer("same")  # no lock contention across namespaces
    await wa.write_at(0, b"from a")
    await wb.write_at(0, b"from b!")
    use("a")
    assert (await cs.status("same")).offset == 6
    use("b")
    assert (await cs.status("same")).offset == 7
    await wa.close()
    await wb.close()


async def test_same_ref_same_namespace_locked(cs: NamespacedContentStore) -> None:
    use("a")
    w = await cs.writer("busy")
    await w.write_at(0, b"123")
    with pytest.raises(Unavailable, match="locked"):
        await cs.writer("busy")
    await w.close()
    w2 = await cs.writer("busy")
    assert w2.status().offset == 3
    await w2.close()


async def test_lock_wait_succeeds_when_released(cs: NamespacedContentStore) -> None:
    use("a")
    w = await cs.writer("r")

    async def release() -> None:
        await asyncio.sleep(0.01)
        await w.close()

    task = asyncio.create_task(release())
    w2 = await cs.writer("r")  # retried until the first writer let go
    await task
    await w2.close()


async def test_offsets_and_truncate(cs: NamespacedContentStore) -> None:
    use("a")
    w = await cs.writer("r")
    await w.write_at(0, b"abc")
    with pytest.raises(OutOfRange, match="write @5 must occur at current offset 3"):
        await w.write_at(5, b"x")
    assert (await w.write_at(3, b"def")).offset == 6
    assert (await w.write_at(0, b"")).offset == 0, "offset 0 restarts the ingest"
    assert (await w.write_at(0, b"new")).offset == 3
    assert await w.commit(3) == sha(b"new")
    await w.close()


async def test_failed_commit_keeps_ingest(cs: NamespacedContentStore) -> None:
    use("a")
    w = await cs.writer("r")
    await w.write_at(0, b"payload")
    with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
        await w.commit(7, sha(b"other"))
    await w.close()
    with pytest.raises(NotFound):
        await cs.info(sha(b"payload"))
    assert (await cs.status("r")).offset == 7
    w = await cs.writer("r")
    with pytest.raises(FailedPrecondition, match="size"):
        await w.commit(8)
    await w.close()
    w = await cs.writer("r")
    assert w.status().offset == 7
    assert await w.commit(7, sha(b"payload")) == sha(b"payload")
    await w.close()
    with pytest.raises(NotFound):
        await cs.status("r")


async def test_already_exists(cs: NamespacedContentStore) -> None:
    use("a")
    dgst = await put(cs, b"dup", ref="one")
    with pytest.raises(AlreadyExists):
        await cs.writer("two", expected=dgst)
    w = await cs.writer("three")
    await w.write_at(0, b"dup")
    with pytest.raises(AlreadyExists):
        await w.commit(3)
    await w.close()
    assert await cs.list_statuses() == []
    assert [i.digest for i in await cs.list_content()] == [dgst]


async def test_update_labels(cs: NamespacedContentStore) -> None:
    use("a")
    dgst = await put(cs, b"x", labels={"keep": "1", "drop": "2"})
    before = await cs.info(dgst)
    info = await cs.update(
        Info(digest=dgst, size=0, labels={"new": "3", "drop": ""}), ["labels.new", "labels.drop"]
    )
    assert info.labels == {"keep": "1", "new": "3"}
    assert info.updated_at >= before.updated_at
    assert (await cs.info(dgst)).labels == {"keep": "1", "new": "3"}
    info = await cs.update(Info(digest=dgst, size=0, labels={"only": "1"}), ["labels"])
    assert info.labels == {"only": "1"}
    info = await cs.update(Info(digest=dgst, size=0, labels={"all": "1"}))
    assert info.labels == {"all": "1"}
    with pytest.raises(InvalidArgument):
        await cs.update(Info(digest=dgst, size=5), ["size"])
    with pytest.raises(InvalidArgument):
        await cs.update(Info(digest=dgst, size=0, labels={"k": "v" * 4096}), ["labels.k"])
    with pytest.raises(InvalidArgument):
        await cs.update(Info(digest="sha256:nope", size=0), ["labels"])
    assert (await cs.info(dgst)).labels == {"all": "1"}
    use("b")
    with pytest.raises(NotFound):
        await cs.update(Info(digest=dgst, size=0, labels={"a": "b"}), ["labels.a"])


async def test_commit_labels_validated(cs: NamespacedContentStore) -> None:
    use("a")
    w = await cs.writer("r")
    await w.write_at(0, b"z")
    with pytest.raises(InvalidArgument):
        await w.commit(1, "", {"k" * 4097: "v"})
    await w.close()
    assert (await cs.status("r")).offset == 1


async def test_list_filters(cs: NamespacedContentStore) -> None:
    use("a")
    d1 = await put(cs, b"one", ref="1", labels={"kind": "layer"})
    d2 = await put(cs, b"two", ref="2", labels={"kind": "config"})
    assert {i.digest for i in await cs.list_content()} == {d1, d2}
    assert {i.digest for i in await cs.list_content([""])} == {d1, d2}
    assert [i.digest for i in await cs.list_content(["labels.kind==layer"])] == [d1]
    assert [i.digest for i in await cs.list_content([f"digest=={d2}"])] == [d2]
    assert {i.digest for i in await cs.list_content(["size==3"])} == {d1, d2}
    with pytest.raises(InvalidArgument):
        await cs.list_content(["labels.kind=="])


async def test_list_statuses_filters(cs: NamespacedContentStore) -> None:
    use("a")
    for ref in ("tar-blobs/sha256/aa", "index"):
        w = await cs.writer(ref)
        await w.write_at(0, b"12")
        await w.close()
    assert sorted(s.ref for s in await cs.list_statuses([""])) == ["index", "tar-blobs/sha256/aa"]
    assert [s.ref for s in await cs.list_statuses(["ref==index"])] == ["index"]
    use("b")
    assert await cs.list_statuses() == []


async def test_abort(cs: NamespacedContentStore) -> None:
    use("a")
    w = await cs.writer("r")
    await w.write_at(0, b"bytes")
    await w.close()
    await cs.abort("r")
    with pytest.raises(NotFound):
        await cs.status("r")
    with pytest.raises(NotFound):
        await cs.abort("r")
    assert cs.backend.list_statuses() == []


async def test_delete_and_events(cs: NamespacedContentStore, recorder: Recorder) -> None:
    use("a")
    dgst = await put(cs, b"both")
    use("b")
    await put(cs, b"both")
    use("a")
    await cs.delete(dgst)
    with pytest.raises(NotFound):
        await cs.info(dgst)
    assert cs.backend.exists(dgst), "namespace b still references the blob"
    use("b")
    assert await cs.read_all(dgst) == b"both"
    await cs.delete(dgst)
    assert not cs.backend.exists(dgst), "no namespace references it any more"
    assert [(t, ns) for t, _, ns in recorder.events] == [
        ("/content/delete", "a"),
        ("/content/delete", "b"),
    ]
    event = recorder.events[0][1]
    assert isinstance(event, content_events.ContentDelete)
    assert event.digest == dgst


async def test_missing_lease_is_not_found(cs: NamespacedContentStore) -> None:
    use("a", lease="nope")
    with pytest.raises(NotFound, match="lease does not exist"):
        await cs.writer("r")
    use("a")
    with pytest.raises(NotFound):
        await cs.status("r")


async def test_leased_ingest_and_content(cs: NamespacedContentStore, db: MetadataDB) -> None:
    await add_lease(db, "a", "l1")
    use("a", lease="l1")
    w = await cs.writer("r")
    await w.write_at(0, b"leased")
    assert await resources(db, "a", "l1") == {("ingests", "r")}
    expires = await db.view(
        lambda c: c.execute("SELECT expires_at FROM ingests WHERE ref='r'").fetchone()[0]
    )
    assert expires == 0, "a leased ingest lives as long as its lease"
    dgst = await w.commit(6)
    await w.close()
    assert await resources(db, "a", "l1") == {("content", dgst)}
    # Opening a writer for content the namespace already has leases it too.
    await add_lease(db, "a", "l2")
    use("a", lease="l2")
    with pytest.raises(AlreadyExists):
        await cs.writer("again", expected=dgst)
    assert await resources(db, "a", "l2") == {("content", dgst)}


async def test_unleased_ingest_expires(cs: NamespacedContentStore, db: MetadataDB) -> None:
    use("a")
    w = await cs.writer("r")
    await w.close()
    expires = await db.view(
        lambda c: c.execute("SELECT expires_at FROM ingests WHERE ref='r'").fetchone()[0]
    )
    assert expires > time.time_ns() + 23 * 3600 * 10**9
