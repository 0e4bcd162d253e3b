"""The on-disk content backend: ingest, resume, locking, atomic commit, path safety."""

from __future__ import annotations

import hashlib
import os
import stat
from typing import TYPE_CHECKING

import pytest

from pycontainerd.content.local import WRITEBACK_BYTES, LocalStore, start_writeback
from pycontainerd.content.store import read_section
from pycontainerd.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)

if TYPE_CHECKING:
    from pathlib import Path


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "content")


def test_write_commit_read(store: LocalStore) -> None:
    data = os.urandom(3 << 20)
    w = store.writer("r1", total=len(data))
    assert w.digest() == sha(b"")
    w.write(data[:1000])
    w.write(data[1000:])
    assert w.status().offset == len(data)
    dgst = w.commit(len(data), sha(data))
    assert dgst == sha(data)
    info = store.info(dgst)
    assert info.size == len(data)
    assert store.read_all(dgst) == data
    path = store.blob_path(dgst)
    assert path == store.root / "blobs" / "sha256" / dgst.removeprefix("sha256:")
    assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, "a committed blob is read-only"
    assert not store.ingest_path("r1").exists(), "the ingest is gone after commit"
    assert [i.digest for i in store.walk()] == [dgst]
    with store.open_reader(dgst) as r:
        assert r.read_at(5, 10) == data[5:15]


def test_pipelined_writes_past_the_writeback_mark(store: LocalStore) -> None:
    """An ingest larger than WRITEBACK_BYTES asks the kernel to start writing it back
    (the request must be one the kernel takes) and still commits the right bytes."""
    data = os.urandom(WRITEBACK_BYTES + (3 << 20))
    w = store.writer("wb", total=len(data))
    for i in range(0, len(data), 1 << 20):
        w.write_pipelined(data[i : i + (1 << 20)])
    assert w.commit(len(data), sha(data)) == sha(data)
    assert store.read_all(sha(data)) == data
    fd = os.open(store.blob_path(sha(data)), os.O_RDONLY)
    try:
        assert start_writeback(fd)
    finally:
        os.close(fd)
    assert not start_writeback(fd), "a closed descriptor is refused: the call is real"


def test_root_is_private(store: LocalStore) -> None:
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700


def test_resume_after_restart(tmp_path: Path) -> None:
    data = os.urandom(5 << 20)
    w = LocalStore(tmp_path / "c").writer("layer", total=len(data))
    w.write(data[: 2 << 20])
    # No close: the daemon "died" with the writer open. A new store on the same dir
    # (a restarted daemon) has no lock and resumes from the bytes on disk.
    again = LocalStore(tmp_path / "c")
    st = again.status("layer")
    assert (st.ref, st.offset, st.total) == ("layer", 2 << 20, len(data))
    w2 = again.writer("layer", total=len(data))
    assert w2.status().offset == 2 << 20
    assert w2.digest() == sha(data[: 2 << 20]), "the digest is recomputed from the data"
    w2.write(data[2 << 20 :])
    assert w2.commit(len(data), sha(data)) == sha(data)
    assert again.read_all(sha(data)) == data


def test_resume_after_close_keeps_started_at(store: LocalStore) -> None:
    w = store.writer("r")
    w.write(b"hello ")
    started = w.status().started_at
    w.close()
    w2 = store.writer("r")
    assert w2.status().offset == 6
    assert w2.status().started_at == started
    w2.write(b"world")
    assert store.read_all(w2.commit()) == b"hello world"


def test_resume_with_other_total_restarts(store: LocalStore) -> None:
    w = store.writer("r", total=10)
    w.write(b"12345")
    w.close()
    w2 = store.writer("r", total=20)
    assert w2.status().offset == 0
    assert w2.digest() == sha(b"")
    assert (store.ingest_path("r") / "data").stat().st_size == 0


def test_truncate_restarts_from_zero(store: LocalStore) -> None:
    w = store.writer("r")
    w.write(b"stale bytes")
    w.truncate(0)
    assert w.status().offset == 0
    w.write(b"fresh")
    assert w.commit(5, sha(b"fresh")) == sha(b"fresh")
    assert store.read_all(sha(b"fresh")) == b"fresh"
    with pytest.raises(InvalidArgument):
        store.writer("other").truncate(3)


def test_second_writer_is_unavailable(store: LocalStore) -> None:
    w = store.writer("busy")
    with pytest.raises(Unavailable, match="locked"):
        store.writer("busy")
    store.writer("not-busy").close()
    w.close()
    w2 = store.writer("busy")
    w2.close()


def test_commit_on_closed_writer_keeps_other_lock(store: LocalStore) -> None:
    w = store.writer("r")
    w.close()
    w2 = store.writer("r")
    with pytest.raises(FailedPrecondition, match="closed writer"):
        w.commit()
    # The stale writer must not have released the lock w2 holds.
    with pytest.raises(Unavailable):
        store.writer("r")
    w2.close()


@pytest.mark.parametrize(
    ("size", "expected", "match"),
    [(0, sha(b"other"), "unexpected commit digest"), (99, "", "unexpected commit size")],
)
def test_failed_commit_keeps_data(store: LocalStore, size: int, expected: str, match: str) -> None:
    w = store.writer("r")
    w.write(b"some data")
    with pytest.raises(FailedPrecondition, match=match):
        w.commit(size, expected)
    with pytest.raises(NotFound):
        store.info(sha(b"some data"))
    assert store.status("r").offset == 9
    w2 = store.writer("r")  # unlocked by the failed commit
    assert w2.status().offset == 9
    assert w2.commit(9, sha(b"some data")) == sha(b"some data")


def test_commit_existing_blob(store: LocalStore) -> None:
    w = store.writer("a")
    w.write(b"same")
    w.commit()
    w2 = store.writer("b")
    w2.write(b"same")
    with pytest.raises(AlreadyExists):
        w2.commit()
    assert not store.ingest_path("b").exists()
    with pytest.raises(AlreadyExists):
        store.writer("c", expected=sha(b"same"))
    store.writer("c").close()  # the failed open left the ref unlocked


def test_status_list_abort(store: LocalStore) -> None:
    for ref in ("x", "y"):
        w = store.writer(ref, total=4)
        w.write(b"ab")
        w.close()
    assert sorted((s.ref, s.offset, s.total) for s in store.list_statuses()) == [
        ("x", 2, 4),
        ("y", 2, 4),
    ]
    store.abort("x")
    with pytest.raises(NotFound):
        store.status("x")
    with pytest.raises(NotFound):
        store.abort("x")
    assert [s.ref for s in store.list_statuses()] == ["y"]


def test_delete(store: LocalStore) -> None:
    w = store.writer("a")
    w.write(b"gone")
    dgst = w.commit()
    store.delete(dgst)
    with pytest.raises(NotFound):
        store.info(dgst)
    with pytest.raises(NotFound):
        store.delete(dgst)
    with pytest.raises(NotFound):
        store.open_reader(dgst)


BAD_DIGESTS = [
    "sha256:../../etc/passwd",
    "sha256:" + "a" * 63,
    "sha256:" + "A" * 64,
    "md5:d41d8cd98f00b204e9800998ecf8427e",
    "",
    "sha256:" + "a" * 64 + "/x",
    "sha256:" + "a" * 64 + "\n",
    "sha256:" + "a" * 64 + "0",
    "sha512:" + "a" * 64,
    "../sha256:" + "a" * 64,
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_digest_strings_used_as_paths(store: LocalStore, digest: str) -> None:
    before = tree(store.root)
    for op in (store.info, store.delete, store.open_reader, store.blob_path, store.exists):
        with pytest.raises(InvalidArgument):
            op(digest)
    if digest:  # an empty expected digest means "none given"
        with pytest.raises(InvalidArgument):
            store.writer("r", expected=digest)
    assert tree(store.root) == before


def test_other_algorithms_validate_but_are_absent(store: LocalStore) -> None:
    with pytest.raises(NotFound):
        store.info("sha512:" + "a" * 128)


@pytest.mark.parametrize(
    "ref", ["../../../../tmp/pwn", "/", "a/b/../../..", "x" * (1 << 20), "réf ☃ \u202e", "."]
)
def test_refs_never_become_paths(tmp_path: Path, ref: str) -> None:
    store = LocalStore(tmp_path / "content")
    w = store.writer(ref)
    w.write(b"data")
    w.close()
    outside = set(tmp_path.iterdir())
    assert outside == {tmp_path / "content"}
    (entry,) = (store.root / "ingest").iterdir()
    assert entry.name == hashlib.sha256(ref.encode()).hexdigest()
    assert store.status(ref).ref == ref, "status echoes the exact ref"
    assert [s.ref for s in store.list_statuses()] == [ref]
    store.abort(ref)
    assert list((store.root / "ingest").iterdir()) == []


def test_empty_ref_is_invalid(store: LocalStore) -> None:
    with pytest.raises(InvalidArgument):
        store.writer("")


def test_read_section_rules() -> None:
    assert read_section(10, 0, 0) == (0, 10)
    assert read_section(10, -5, 3) == (0, 3)
    assert read_section(10, 4, 100) == (4, 6)
    assert read_section(10, 10, 0) == (10, 0)
    with pytest.raises(OutOfRange):
        read_section(10, 11, 0)
