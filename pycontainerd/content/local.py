"""The on-disk content backend: ``blobs/<alg>/<hex>`` plus resumable ingests.

Layout under the store root (the plugin's root directory, mode 0700)::

    blobs/sha256/<hex>                   committed blobs, read-only
    ingest/<sha256(ref)>/ref             the ref, verbatim (the dir name is its hash, so a
                         data            ref never becomes a path component)
                         startedat       integer nanoseconds, written tmp-then-rename
                         updatedat
                         total           expected size, when the client gave one

Everything here is synchronous: callers run each whole operation (open a writer, write one
chunk, commit) in one ``asyncio.to_thread`` hop. Guarantees, as containerd's
``content/local``:

- only one writer per ref at a time, by an in-process lock (a second gets Unavailable
  "ref … locked"; locks vanish with the process, the data does not);
- reopening a ref resumes it: the offset is the data size and the digest is recomputed by
  re-reading the data;
- commit fsyncs the data, checks size and digest (FailedPrecondition, data kept so the
  client can resume), then renames the file into ``blobs/`` — a blob is never visible with
  partial content — and fsyncs the directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pycontainerd.content.store import ALGORITHMS, Info, Status, split_digest
from pycontainerd.errdefs import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from pycontainerd.snapshots.mount import libc

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType

__all__ = ["WRITEBACK_BYTES", "BlobReader", "LocalStore", "LocalWriter", "start_writeback"]

log = logging.getLogger(__name__)

# Resume hashing and copies read this much at a time.
_BUFSIZE = 1 << 20


def _hash_ref(ref: str) -> str:
    # surrogatepass: any str the API hands us has *some* stable byte form.
    return hashlib.sha256(ref.encode("utf-8", "surrogatepass")).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobReader:
    """An open committed blob; ``read_at`` is positional, so one reader serves any range."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file)."""
        return os.pread(self._fd, n, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalStore:
    """Blobs and ingests under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (root / "blobs").mkdir(exist_ok=True, mode=0o755)
        (root / "ingest").mkdir(exist_ok=True, mode=0o755)
        self._locks: dict[str, float] = {}
        self._locks_mu = threading.Lock()

    # --- blobs ---------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob named ``digest`` lives; InvalidArgument for a malformed digest."""
        alg, hexpart = split_digest(digest)
        return self.root / "blobs" / alg / hexpart

    def info(self, digest: str) -> Info:
        """Size and times of a blob on disk; NotFound when absent."""
        try:
            st = os.stat(self.blob_path(digest))
        except FileNotFoundError:
            raise NotFound(f"content {digest}") from None
        return Info(
            digest=digest, size=st.st_size, created_at=st.st_mtime_ns, updated_at=st.st_mtime_ns
        )

    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def walk(self) -> Iterator[Info]:
        """Every blob on disk (files with a name that is no valid digest are skipped)."""
        blobs = self.root / "blobs"
        for alg in ALGORITHMS:
            try:
                entries = list(os.scandir(blobs / alg))
            except FileNotFoundError:
                continue
            for entry in entries:
                digest = f"{alg}:{entry.name}"
                try:
                    split_digest(digest)
                    st = entry.stat()
                except (InvalidArgument, FileNotFoundError):
                    log.warning("skipping unexpected file %s in content store", entry.path)
                    continue
                yield Info(
                    digest=digest,
                    size=st.st_size,
                    created_at=st.st_mtime_ns,
                    updated_at=st.st_mtime_ns,
                )

    def delete(self, digest: str) -> None:
        """Remove a blob file; NotFound when absent."""
        try:
            os.unlink(self.blob_path(digest))
        except FileNotFoundError:
            raise NotFound(f"content {digest}") from None

    def open_reader(self, digest: str) -> BlobReader:
        """Open a blob for reading; NotFound when absent."""
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content {digest}") from None
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return BlobReader(fd, size)

    def read_all(self, digest: str) -> bytes:
        """The whole blob (meant for small blobs: manifests, configs, indexes)."""
        with self.open_reader(digest) as r:
            return r.read_at(0, r.size)

    # --- ingests -------------------------------------------------------------------

    def ingest_path(self, ref: str) -> Path:
        """The ingest directory of ``ref``: always ``ingest/<sha256(ref)>``."""
        return self.root / "ingest" / _hash_ref(ref)

    def writer(self, ref: str, total: int = 0, expected: str = "") -> LocalWriter:
        """Begin or resume the ingest ``ref``.

        Raises InvalidArgument for an empty ref or malformed ``expected``, AlreadyExists
        when ``expected`` is already committed, Unavailable when another writer holds the
        ref (no waiting here: the async layer retries).
        """
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if expected and self.exists(expected):
            raise AlreadyExists(f"content {expected}")
        self._lock(ref)
        try:
            return self._open_writer(ref, total)
        except BaseException:
            self._unlock(ref)
            raise

    def status(self, ref: str) -> Status:
        """Progress of the ingest ``ref``; NotFound when there is none."""
        return self._status(self.ingest_path(ref))

    def list_statuses(self) -> list[Status]:
        """Progress of every ingest on disk."""
        out: list[Status] = []
        for entry in os.scandir(self.root / "ingest"):
            try:
                out.append(self._status(Path(entry.path)))
            except NotFound:
                continue
        return out

    def abort(self, ref: str) -> None:
        """Remove the ingest ``ref`` and its data; NotFound when there is none."""
        path = self.ingest_path(ref)
        if not path.is_dir():
            raise NotFound(f"ingest ref {ref!r}")
        shutil.rmtree(path, ignore_errors=True)

    def locked(self, ref: str) -> bool:
        with self._locks_mu:
            return ref in self._locks

    def _lock(self, ref: str) -> None:
        with self._locks_mu:
            since = self._locks.get(ref)
            if since is None:
                self._locks[ref] = time.time()
                return
        held = time.time() - since
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        raise Unavailable(f"ref {ref} locked for {held:.3f}s (since {started})")

    def _unlock(self, ref: str) -> None:
        with self._locks_mu:
            self._locks.pop(ref, None)

    def _status(self, path: Path) -> Status:
        try:
            st = os.stat(path / "data")
            ref = (path / "ref").read_text("utf-8", "surrogatepass")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"ingest {path.name}") from None
        updated = max(_read_int(path / "updatedat"), st.st_mtime_ns)
        return Status(
            ref=ref,
            offset=st.st_size,
            total=_read_int(path / "total"),
            started_at=_read_int(path / "startedat"),
            updated_at=updated,
        )

    def _resume(self, path: Path, ref: str, total: int) -> tuple[Status, hashlib._Hash] | None:
        """Status and digest state of an existing ingest, or None if it cannot be resumed."""
        try:
            st = self._status(path)
        except NotFound:
            return None
        if st.ref != ref:
            # A hash collision or a damaged directory: never append to someone else's data.
            log.warning("ingest %s holds ref %r, not %r; restarting it", path.name, st.ref, ref)
            return None
        if total > 0 and st.total > 0 and total != st.total:
            log.info("ingest %r: total changed from %d to %d; restarting it", ref, st.total, total)
            return None
        hasher = hashlib.sha256()
        offset = 0
        with open(path / "data", "rb", buffering=0) as f:
            while chunk := f.read(_BUFSIZE):
                hasher.update(chunk)
                offset += len(chunk)
        return Status(
            ref=ref,
            offset=offset,
            total=st.total,
            started_at=st.started_at,
            updated_at=st.updated_at,
        ), hasher

    def _open_writer(self, ref: str, total: int) -> LocalWriter:
        path = self.ingest_path(ref)
        resumed = None
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            resumed = self._resume(path, ref, total)
        if resumed is None:
            now = time.time_ns()
            (path / "ref").write_text(ref, "utf-8", "surrogatepass")
            _write_atomic(path / "startedat", str(now))
            _write_atomic(path / "updatedat", str(now))
            if total > 0:
                _write_atomic(path / "total", str(total))
            else:
                (path / "total").unlink(missing_ok=True)
            status = Status(ref=ref, offset=0, total=total, started_at=now, updated_at=now)
            hasher = hashlib.sha256()
        else:
            status, hasher = resumed
        fd = os.open(path / "data", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # Drop anything past what was hashed (a fresh ingest over stale data).
            os.ftruncate(fd, status.offset)
            os.lseek(fd, status.offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return LocalWriter(self, path, fd, status, hasher)


# Bytes an ingest may have acknowledged but not yet written to disk.
PIPELINE_BYTES = 8 << 20
# An ingest asks the kernel to start writing its file back every this many bytes, so that
# the fsync at commit finds most of it on disk already: that fsync was ~35 ms of each
# 67 MB layer's commit in ``ctr images import``, with ctr waiting for it.
WRITEBACK_BYTES = 8 << 20

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None
try:
    _sync_file_range = libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except AttributeError:  # not glibc on Linux: commit's fsync does it all
    _sync_file_range = None


def start_writeback(fd: int) -> bool:
    """Start writing ``fd``'s dirty pages to disk, without waiting for them
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no durability by itself); whether the
    kernel took the request."""
    if _sync_file_range is None:
        return False
    return bool(_sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0)


class LocalWriter:
    """One open ingest, holding its ref's lock until commit or close.

    Its methods serialize on an internal lock, so a ``close`` from a cancelled stream waits
    for a write still running in another worker thread instead of racing it for the fd.
    """

    def __init__(
        self, store: LocalStore, path: Path, fd: int, status: Status, hasher: hashlib._Hash
    ) -> None:
        self._store = store
        self._path = path
        self._fd: int | None = fd
        self._hasher = hasher
        self._mu = threading.Lock()
        self._holds_lock = True
        # Pipelined writes: hashed at once (responses report the digest), written to disk
        # in order by one thread of the writer's own while the client prepares more.
        self._disk: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[None], int]] = deque()
        self._pending_bytes = 0
        self._failed: BaseException | None = None
        self._unsynced = 0  # bytes written since the disk was last asked to catch up
        self.ref = status.ref
        self.offset = status.offset
        self.total = status.total
        self.started_at = status.started_at
        self.updated_at = status.updated_at

    def status(self) -> Status:
        return Status(
            ref=self.ref,
            offset=self.offset,
            total=self.total,
            started_at=self.started_at,
            updated_at=self.updated_at,
        )

    @property
    def data_path(self) -> Path:
        """The file the bytes go to (until commit moves it under its digest)."""
        return self._path / "data"

    def digest(self) -> str:
        """Digest of the bytes written so far."""
        return "sha256:" + self._hasher.copy().hexdigest()

    def _open_fd(self) -> int:
        if self._fd is None:
            raise FailedPrecondition(f"writer {self.ref!r} is closed")
        return self._fd

    def _release(self) -> None:
        # Only once: a later writer of the same ref may hold the lock by now.
        if self._holds_lock:
            self._holds_lock = False
            self._store._unlock(self.ref)

    def write(self, data: bytes | memoryview) -> int:
        """Append ``data`` and hash it; DataLoss if the disk took none of it."""
        with self._mu:
            self._drain()
            return self._write(data)

    def write_pipelined(self, data: bytes | memoryview) -> None:
        """Hash ``data`` and count it now; write it to disk in the background, in order.

        Errors of a background write surface on the next call (as DataLoss). At most
        ``PIPELINE_BYTES`` wait for the disk; beyond that this call waits for the oldest.
        """
        with self._mu:
            self._check_failed()
            fd = self._open_fd()
            if self._disk is None:
                self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
            self._pending.append((self._disk.submit(self._write_raw, fd, data), len(data)))
            self._pending_bytes += len(data)
            self._hasher.update(data)
            self.offset += len(data)
            self.updated_at = time.time_ns()
            while self._pending_bytes > PIPELINE_BYTES:
                self._wait_oldest()

    def _write_raw(self, fd: int, data: bytes | memoryview) -> None:
        """Write all of ``data``; DataLoss if the disk takes nothing."""
        view = memoryview(data)
        written = 0
        while written < len(view):
            n = os.write(fd, view[written:])
            if n <= 0:
                raise DataLoss(f"wrote {written} of {len(view)} bytes")
            written += n
        self._unsynced += written
        if self._unsynced >= WRITEBACK_BYTES:
            self._unsynced = 0
            start_writeback(fd)

    def _wait_oldest(self) -> None:
        fut, size = self._pending.popleft()
        self._pending_bytes -= size
        try:
            fut.result()
        except BaseException as exc:
            self._failed = self._failed or exc

    def _drain(self) -> None:
        """Wait for every background write; DataLoss if one failed."""
        while self._pending:
            self._wait_oldest()
        if self._disk is not None:
            self._disk.shutdown(wait=False)
            self._disk = None
        self._check_failed()

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise DataLoss(f"ingest {self.ref!r}: a write failed: {self._failed}")

    def _write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self._write_raw(self._open_fd(), view)
        written = len(view)
        # hashlib releases the GIL for large buffers, so this thread hop runs in parallel
        # with the event loop.
        self._hasher.update(view)
        self.offset += written
        self.updated_at = time.time_ns()
        return written

    def truncate(self, size: int = 0) -> None:
        """Restart the ingest from byte 0 (the only size the protocol uses)."""
        if size != 0:
            raise InvalidArgument("truncate: only size 0 is supported")
        with self._mu:
            self._drain()
            fd = self._open_fd()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            self._hasher = hashlib.sha256()
            self.offset = 0
            self.updated_at = time.time_ns()

    def commit(self, size: int = 0, expected: str = "") -> str:
        """Make the data a blob; returns its digest.

        FailedPrecondition on a size (when ``size`` > 0) or digest mismatch — the data
        stays in the ingest for a resume; AlreadyExists (ingest removed) when the blob is
        already on disk. The writer is closed and the ref unlocked in every case.
        """
        with self._mu:
            try:
                self._drain()
            except BaseException:
                self._close()
                raise
            return self._commit(size, expected)

    def _commit(self, size: int, expected: str) -> str:
        fd, self._fd = self._fd, None
        try:
            if fd is None:
                raise FailedPrecondition("cannot commit on closed writer")
            try:
                os.fsync(fd)
                actual_size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > 0 and size != actual_size:
                raise FailedPrecondition(f"unexpected commit size {actual_size}, expected {size}")
            dgst = self.digest()
            if expected and expected != dgst:
                raise FailedPrecondition(f"unexpected commit digest {dgst}, expected {expected}")
            target = self._store.blob_path(dgst)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            if target.exists():
                shutil.rmtree(self._path, ignore_errors=True)
                raise AlreadyExists(f"content {dgst}")
            try:
                os.rename(self._path / "data", target)
            except FileNotFoundError:
                raise NotFound(f"ingest ref {self.ref!r} was aborted") from None
            _fsync_dir(target.parent)
            try:
                now = time.time_ns()
                os.utime(target, ns=(now, now))
                # Read-only from now on: a blob never changes under its name.
                os.chmod(target, 0o444)
            except OSError as exc:
                log.warning("blob %s: cannot set times/mode: %s", dgst, exc)
            shutil.rmtree(self._path, ignore_errors=True)
            return dgst
        finally:
            self._release()

    def close(self) -> None:
        """Keep the data for a later resume, record the update time, release the ref."""
        with self._mu:
            try:
                self._drain()
            except DataLoss as exc:
                log.warning("%s", exc)
            self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # An ingest aborted while open has no directory left to record anything in.
            with contextlib.suppress(FileNotFoundError):
                _write_atomic(self._path / "updatedat", str(self.updated_at))
        finally:
            self._release()
