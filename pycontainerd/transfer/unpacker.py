"""The speculative unpacker: a helper process that unpacks blobs while they are written.

The daemon starts one (``python -m pycontainerd.transfer.unpacker FD``) the first time a
blob written through the Content service looks like a layer, and talks to it over a
``SOCK_SEQPACKET`` socket pair, one JSON message per packet:

- ``{"op": "begin", "id": N, "path": DIR, "limit": L}`` with the ingest's data file
  descriptor attached (SCM_RIGHTS): unpack that file, as it grows, into the new
  directory ``DIR``, in overlay form with deferred parents
  (:func:`pycontainerd.archive.apply_layer`), giving up past ``L`` uncompressed bytes
  (0: no limit) — nobody asked for this unpack, so a decompression bomb must not fill
  the disk;
- ``{"op": "end", "id": N, "size": S}``: the blob is committed with ``S`` bytes;
  ``{"op": "cancel", "id": N}``. Until the end, the file is read as far as it goes and
  looked at again every few milliseconds;
- ``{"op": "hurry", "id": N}``: someone waits for this job (Diff.Apply of the layer):
  it leaves the idle class (below). ``"hurry": true`` in ``begin`` does so from the start.

It answers each job once: ``{"id": N, "result": {...}}`` (the ``ApplyResult`` fields) or
``{"id": N, "error": "..."}``. A separate process, so that this work never competes for
the daemon's interpreter lock with the event loop answering the very client that writes
the blobs. Its threads run in the ``SCHED_IDLE`` class: they use only the CPU the client
and the daemon leave idle. The writes alternate with their replies (ctr waits for each),
so there is idle CPU in every write; at nice 10 instead, the unpack still took its share
of the two cores from the client's own hashing and the import was ~10 % slower. A job
someone waits for moves to ``SCHED_OTHER`` at nice 10, so that a busy machine cannot
starve it; if the kernel refuses, the job gives up and the daemon applies the blob
itself. It exits when the daemon's end of the socket closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pycontainerd.archive import ArchiveCanceled, apply_layer, decompress_stream

__all__ = ["MAX_MESSAGE", "main"]

MAX_MESSAGE = 64 << 10
_POLL = 0.01  # seconds between looks at a file that has no new bytes yet


class _Limited:
    """The uncompressed stream, cut off past ``limit`` bytes."""

    def __init__(self, src: Any, limit: int) -> None:
        self._src = src
        self._left = limit

    def read(self, n: int, /) -> bytes:
        data: bytes = self._src.read(n)
        self._left -= len(data)
        if self._left < 0:
            raise OverflowError("the layer unpacks to more than the speculation allows")
        return data


class _Job:
    def __init__(self, job_id: int, fd: int, path: Path, limit: int) -> None:
        self.id = job_id
        self.fd = fd
        self.path = path
        self.limit = limit
        self.size: int | None = None
        self.canceled = False
        self.cond = threading.Condition()
        self.pos = 0
        self.tid: int | None = None  # the worker thread's, once it runs
        self.hurried = False

    def read(self, n: int = -1, /) -> bytes:
        """The next bytes of the file as it grows; b"" once all ``size`` bytes are read."""
        n = 1 << 20 if n < 0 else n
        while True:
            if self.canceled:
                raise ArchiveCanceled("canceled")
            limit = n if self.size is None else min(n, self.size - self.pos)
            if limit <= 0:
                return b""
            data = os.pread(self.fd, limit, self.pos)
            if data:
                self.pos += len(data)
                return data
            size = self.size  # (the daemon's "end" may have come since ``limit``)
            if size is not None:
                if self.pos >= size:
                    return b""
                raise EOFError(f"the blob ends at {self.pos} of its {size} bytes")
            with self.cond:
                if self._waiting():
                    self.cond.wait(_POLL)

    def _waiting(self) -> bool:
        """Whether more may come (the other thread sets ``size`` and ``canceled``)."""
        return self.size is None and not self.canceled

    def poke(self, size: int | None = None, cancel: bool = False) -> None:
        with self.cond:
            if size is not None:
                self.size = size
            self.canceled = self.canceled or cancel
            self.cond.notify_all()

    def hurry(self) -> None:
        """Someone waits for this job: its thread leaves the idle class."""
        with self.cond:  # against run() setting the class at the same time
            self.hurried = True
            if self.tid is None:
                return  # run() will not enter the idle class
            try:
                os.sched_setscheduler(self.tid, os.SCHED_OTHER, os.sched_param(0))
            except ProcessLookupError:
                return  # the job has just ended
            except OSError:
                pass
            else:
                return
        self.poke(cancel=True)  # left idle, it could starve: the daemon applies itself

    def run(self, answer: Any) -> None:
        with self.cond:
            self.tid = threading.get_native_id()
            if not self.hurried:
                # Only the CPU nobody else wants (see the module's text); nice 10 if refused.
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        try:
            self.path.mkdir(mode=0o755)
            stream: Any = decompress_stream(self)
            if self.limit > 0:
                stream = _Limited(stream, self.limit)
            result = apply_layer(self.path, stream, overlay=True, defer_parents=True)
            doc = asdict(result)
            for key, value in doc.items():
                if isinstance(value, (frozenset, tuple)):
                    doc[key] = sorted(value) if isinstance(value, frozenset) else list(value)
            answer({"id": self.id, "result": doc})
        except BaseException as exc:  # any failure: the daemon unpacks the blob itself
            answer({"id": self.id, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            os.close(self.fd)
            with self.cond:
                self.tid = None  # (a later thread may get the number)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    with contextlib.suppress(OSError):
        # For every thread; the jobs' threads also enter the idle class unless hurried.
        # This one stays out of it: it must read a "hurry" on a busy machine.
        os.nice(10)
    jobs: dict[int, _Job] = {}
    send_lock = threading.Lock()

    def answer(doc: dict[str, Any]) -> None:
        jobs.pop(int(doc["id"]), None)
        data = json.dumps(doc).encode()
        if len(data) > MAX_MESSAGE:  # (a layer implying tens of thousands of directories)
            data = json.dumps({"id": doc["id"], "error": "result too large"}).encode()
        with send_lock, contextlib.suppress(OSError):
            sock.send(data)

    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except OSError:
            break
        if not data:
            break  # the daemon is gone
        msg = json.loads(data)
        job_id = int(msg["id"])
        op = msg["op"]
        if op == "begin" and fds:
            job = _Job(job_id, fds[0], Path(msg["path"]), int(msg.get("limit", 0)))
            jobs[job_id] = job
            if msg.get("hurry"):
                job.hurry()
            threading.Thread(target=job.run, args=(answer,), daemon=True).start()
            continue
        for fd in fds:
            os.close(fd)
        found = jobs.get(job_id)
        if found is None:
            continue
        if op == "end":
            found.poke(size=int(msg["size"]))
        elif op == "cancel":
            found.poke(cancel=True)
        elif op == "hurry":
            found.hurry()
    for job in list(jobs.values()):
        job.poke(cancel=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
