"""A process's stdio: the client's FIFOs (or ``file://`` logs), pipes, pumps and the pty.

What the client expects (containerd's ``pkg/process/io.go``, ctr-contract §4.2):

* stdout/stderr FIFOs are also opened read-only by the shim and kept: a *keep-alive reader*,
  so the container never gets EPIPE when the client goes away (``ctr run -d``).
* The init process's stdin FIFO gets a writer held by the shim until ``CloseIO``, so the
  container sees no EOF when the client closes its end.
* After an exec is deleted its output FIFOs reach EOF even if a background child still holds
  the process's pipe: exec output goes through pipes the shim copies and can cut off.

The init process (no terminal) gets the FIFOs themselves as its stdio — no copying, so all
output is in the FIFO when it exits. Exec processes get pipes and pumps; a terminal gets
runc's pty master (over ``--console-socket``) and pumps both ways. Empty paths are
``/dev/null``. Opening never blocks: FIFOs are opened ``O_NONBLOCK`` (the reader first).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import socket
import struct
import tempfile
import termios
from dataclasses import dataclass, field

from pycontainerd.errdefs import InvalidArgument, Unimplemented
from pycontainerd.runtime.runc import Stdio
from pycontainerd.shim.reaper import wake, write_all

__all__ = ["ConsoleSocket", "ProcessIO", "StdioPaths", "open_io"]

log = logging.getLogger(__name__)

_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class StdioPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


def _target(uri: str) -> tuple[str, str]:
    """(scheme, path) of a stdio string: a bare path is a FIFO."""
    if "://" not in uri:
        return "fifo", uri
    scheme, _, rest = uri.partition("://")
    path = rest.split("?", 1)[0]
    if scheme == "fifo":
        return "fifo", path
    if scheme == "file":
        return "file", path
    if scheme == "binary":
        raise Unimplemented(f"stdio {uri!r}: binary logging drivers are not supported")
    raise InvalidArgument(f"stdio {uri!r}: unknown scheme {scheme!r}")


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, wake, fut)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def pump(src: int, dst: int) -> None:
    """Copy ``src`` to ``dst`` until EOF (EIO on a pty master counts as EOF).

    Waits for readiness before the first read: a FIFO read with no writer connected yet
    returns EOF, while epoll reports it only once data arrives or a writer has left. A
    failing destination does not stop the copy: the source is drained so the process
    never blocks on a full pipe.
    """
    os.set_blocking(src, False)
    dst_ok = True
    while True:
        await _readable(src)
        while True:
            try:
                data = os.read(src, _CHUNK)
            except BlockingIOError:
                break
            except OSError:  # EIO: the pty's last slave is closed
                return
            if not data:
                return
            if dst_ok:
                try:
                    await write_all(dst, data)
                except OSError as exc:
                    log.debug("stdio copy: destination failed: %s", exc)
                    dst_ok = False


@dataclass(eq=False)
class ProcessIO:
    """The shim's side of one process's stdio; ``child`` are the fds runc gets."""

    paths: StdioPaths
    child: Stdio = field(default_factory=Stdio)
    _child_fds: list[int] = field(default_factory=list)
    _held: list[int] = field(default_factory=list)  # keep-alive readers, FIFO writers
    _stdin_keeper: int = -1
    _stdin_src: int = -1  # stdin FIFO read end, copied into a pipe or the pty
    _stdin_dst: int = -1  # pipe write end towards the process
    _out_copies: list[tuple[int, int]] = field(default_factory=list)  # (pipe read, fifo write)
    _stdout_fifo: int = -1  # for the pty's output
    _master: int = -1
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _out_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stdin_task: asyncio.Task[None] | None = None
    closed: bool = False

    def _fd(self, fd: int, held: bool = True) -> int:
        if held:
            self._held.append(fd)
        return fd

    def close_child_fds(self) -> None:
        """After runc started the process: the shim keeps none of the child's ends."""
        for fd in self._child_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._child_fds.clear()

    def start_copies(self) -> None:
        """Start the pumps (call on the loop, once runc has the child fds)."""
        for src, dst in self._out_copies:
            self._out_tasks.append(asyncio.get_running_loop().create_task(self._copy_out(src, dst)))
        if self._stdin_src >= 0 and self._stdin_dst >= 0:
            self._stdin_task = asyncio.get_running_loop().create_task(self._copy_stdin())

    async def _copy_out(self, src: int, dst: int) -> None:
        await pump(src, dst)
        # The output ended: the client's reader gets EOF now, not at delete.
        if not self.closed:
            self._out_copies.remove((src, dst))
            asyncio.get_running_loop().remove_writer(dst)
            os.close(dst)
            if src != self._master:
                asyncio.get_running_loop().remove_reader(src)
                os.close(src)
            else:
                self._stdout_fifo = -1

    async def _copy_stdin(self) -> None:
        try:
            await pump(self._stdin_src, self._stdin_dst)
        finally:
            if self._master < 0:  # a pipe: EOF for the process; a pty is left open
                self._close_fd("_stdin_dst")
            self._close_fd("_stdin_src")

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        if fd >= 0:
            setattr(self, name, -1)
            with contextlib.suppress(OSError):
                os.close(fd)

    def set_console(self, master: int) -> None:
        """Wire runc's pty master: stdin FIFO → master, master → stdout FIFO."""
        os.set_blocking(master, False)
        self._master = master
        if self._stdin_src >= 0:
            self._stdin_dst = master
        if self._stdout_fifo >= 0:
            self._out_copies.append((master, self._stdout_fifo))

    def resize(self, width: int, height: int) -> None:
        if self._master < 0:
            raise InvalidArgument("process has no terminal")
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until the process's output is copied out."""
        if not self._out_tasks:
            return
        await asyncio.wait(self._out_tasks, timeout=timeout_s)

    def close_stdin(self) -> None:
        """``CloseIO``: drop the shim's own stdin writer so the process can see EOF."""
        self._close_fd("_stdin_keeper")

    def close(self) -> None:
        """Close everything: pending copies stop, the client's readers see EOF."""
        if self.closed:
            return
        self.closed = True
        for t in [*self._out_tasks, *self._tasks]:
            t.cancel()
        if self._stdin_task is not None:
            self._stdin_task.cancel()
        self.close_child_fds()
        fds = {*self._held, self._stdin_keeper, self._stdin_src, self._stdin_dst, self._master}
        fds.update(fd for pair in self._out_copies for fd in pair)
        fds.add(self._stdout_fifo)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for fd in fds:
            if fd >= 0:
                # Unregister now: the cancelled pumps clean up only on the next loop turn,
                # when the fd number may already belong to a new file.
                if loop is not None:
                    loop.remove_reader(fd)
                    loop.remove_writer(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._held.clear()
        self._out_copies.clear()
        self._stdin_keeper = self._stdin_src = self._stdin_dst = -1
        self._master = self._stdout_fifo = -1


def _open_out(path: str, io: ProcessIO, *, blocking: bool) -> int:
    """A write fd on an output target; FIFOs also get the keep-alive reader."""
    kind, p = _target(path)
    if kind == "file":
        os.makedirs(os.path.dirname(p) or "/", exist_ok=True)
        return os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    io._fd(os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    w = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(w, blocking)
    return w


def open_io(paths: StdioPaths, *, direct: bool, keep_stdin: bool) -> ProcessIO:
    """Open a process's stdio (sync; never blocks). ``direct``: the FIFOs are the child's
    stdio; otherwise pipes with pumps. ``keep_stdin``: hold a stdin writer until CloseIO."""
    io = ProcessIO(paths)
    try:
        stdin = stdout = stderr = None
        if paths.stdin:
            _kind, p = _target(paths.stdin)
            rd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            if keep_stdin:
                io._stdin_keeper = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            if direct and not paths.terminal:
                os.set_blocking(rd, True)
                io._child_fds.append(rd)
                stdin = rd
            else:
                io._stdin_src = rd
                if not paths.terminal:
                    pr, pw = os.pipe2(os.O_CLOEXEC)
                    io._child_fds.append(pr)
                    stdin, io._stdin_dst = pr, pw
                    os.set_blocking(pw, False)
        if paths.terminal:
            if paths.stdout:
                io._stdout_fifo = _open_out(paths.stdout, io, blocking=False)
            io.child = Stdio()
            return io
        for name in ("stdout", "stderr"):
            path = getattr(paths, name)
            if not path:
                continue
            direct_fd = direct or _target(path)[0] == "file"
            w = _open_out(path, io, blocking=direct_fd)
            if direct_fd:
                io._child_fds.append(w)
                fd = w
            else:
                pr, pw = os.pipe2(os.O_CLOEXEC)
                io._child_fds.append(pw)
                io._out_copies.append((pr, w))
                fd = pw
            if name == "stdout":
                stdout = fd
            else:
                stderr = fd
        io.child = Stdio(stdin, stdout, stderr)
        return io
    except BaseException:
        io.close()
        raise


class ConsoleSocket:
    """runc's ``--console-socket``: a listening unix socket that receives the pty master."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="pty")
        self.path = os.path.join(self._dir, "pty.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(1)
        self._sock.setblocking(False)

    async def receive(self) -> int:
        """Accept runc's connection and return the master fd it sends."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        with conn:
            conn.setblocking(False)
            while True:
                await _readable(conn.fileno())
                try:
                    _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
                except BlockingIOError:
                    continue
                if not fds:
                    raise InvalidArgument("console socket: no file descriptor received")
                for extra in fds[1:]:
                    os.close(extra)
                os.set_inheritable(fds[0], False)
                return fds[0]

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)
