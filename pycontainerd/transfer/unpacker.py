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
  looked at again every few milliseconds.

It answers each job once: ``{"id": N, "result": {...}}`` (the ``ApplyResult`` fields) or
``{"id": N, "error": "..."}``. A separate process, at a lower priority, so that this work
never competes for the daemon's interpreter lock with the event loop answering the very
client that writes the blobs; it uses the CPU the client and the daemon leave idle. It
exits when the daemon's end of the socket closes.
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
            if self.size is not None:
                raise EOFError(f"the blob ends at {self.pos} of its {self.size} bytes")
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

    def run(self, answer: Any) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    with contextlib.suppress(OSError):
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
    for job in list(jobs.values()):
        job.poke(cancel=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
