"""The per-container log writer: a container's stdout/stderr FIFOs to a CRI log file.

Run as ``python -m pycontainerd.cri.logwriter LOG_PATH MAX_LINE STDOUT_FD [STDERR_FD]`` in a
session of its own, with the FIFOs' read ends (opened ``O_NONBLOCK`` by the daemon before
the task exists) inherited as those fds. It is a separate process, not a task of the
daemon, so that a container's output keeps reaching its log while the daemon restarts (the
role containerd gives its shim-side ``binary://`` loggers). A FIFO read end that never had
a writer does not poll readable on Linux, so the writer simply waits for the shim; it
turns the bytes into CRI log records
``<RFC3339Nano> <stdout|stderr> <F|P> <line>\\n`` — ``P`` for a piece of a line longer than
MAX_LINE or cut off by EOF — and exits when every stream reaches EOF, which is when the
container's processes have all closed it. SIGUSR1 reopens the log file (ReopenContainerLog,
after kubelet rotated it).

The daemon normally does not start this module per container: a resident fork server
(``pycontainerd.cri.logserver``, also started as ``python -m pycontainerd.cri.logwriter
--serve SOCKET``) forks a child that calls :func:`run` instead; spawning this module
directly is the fallback when that server cannot be had.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time

__all__ = ["LineSplitter", "format_record", "main", "rfc3339nano", "run"]

DEFAULT_MAX_LINE = 16384
_CHUNK = 65536


def rfc3339nano(ns: int) -> str:
    """Go's RFC3339Nano in UTC: fractional seconds without trailing zeros."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else base + "Z"


def format_record(stream: str, tag: str, line: bytes, ns: int | None = None) -> bytes:
    stamp = rfc3339nano(time.time_ns() if ns is None else ns)
    return f"{stamp} {stream} {tag} ".encode() + line + b"\n"


class LineSplitter:
    """Bytes in, ``(tag, line)`` records out, per the CRI log rules."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max(1, max_line)
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self._buf += data
        out: list[tuple[str, bytes]] = []
        while True:
            nl = self._buf.find(b"\n", 0, self.max_line + 1)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                out.append(("F", line.removesuffix(b"\r")))
            elif len(self._buf) > self.max_line:
                out.append(("P", bytes(self._buf[: self.max_line])))
                del self._buf[: self.max_line]
            else:
                return out

    def close(self) -> list[tuple[str, bytes]]:
        """What EOF leaves: an unterminated line is a partial record."""
        if not self._buf:
            return []
        rest = bytes(self._buf)
        self._buf.clear()
        return [("P", rest)]


class _Log:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def reopen(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path) or "/", exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError:
            return  # keep writing where we were; the next reopen may work
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            self.reopen()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except OSError:
                # A full or vanished disk must not back up into the container: drop it.
                return


def run(log_path: str, fifos: list[tuple[str, int]], max_line: int) -> None:
    log = _Log(log_path)

    def on_usr1(_sig: int, _frame: object) -> None:
        # The handler runs between select() calls, never inside a write: reopen now, so
        # the new file exists as soon as kubelet's ReopenContainerLog returns.
        log.reopen()

    signal.signal(signal.SIGUSR1, on_usr1)
    log.reopen()  # the file exists (empty) from the start, for kubelet to read
    sel = selectors.DefaultSelector()
    splitters: dict[int, tuple[str, LineSplitter]] = {}
    for stream, fd in fifos:
        os.set_blocking(fd, False)
        splitters[fd] = (stream, LineSplitter(max_line))
        sel.register(fd, selectors.EVENT_READ)
    while splitters:
        for key, _ in sel.select():
            fd = int(key.fd)
            stream, splitter = splitters[fd]
            try:
                data = os.read(fd, _CHUNK)
            except BlockingIOError:
                continue
            records = splitter.feed(data) if data else splitter.close()
            if records:
                log.write(b"".join(format_record(stream, t, line) for t, line in records))
            if not data:
                sel.unregister(fd)
                os.close(fd)
                del splitters[fd]
    if log.fd >= 0:
        os.close(log.fd)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        from pycontainerd.cri import logserver

        return logserver.main(argv[1:])
    if len(argv) < 3:
        print(
            "usage: logwriter LOG_PATH MAX_LINE STDOUT_FD [STDERR_FD]\n"
            "       logwriter --serve SOCKET [--idle-exit SECONDS]",
            file=sys.stderr,
        )
        return 2
    log_path, max_line = argv[0], int(argv[1])
    fifos = [("stdout", int(argv[2]))]
    if len(argv) > 3:
        fifos.append(("stderr", int(argv[3])))
    run(log_path, fifos, max_line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
