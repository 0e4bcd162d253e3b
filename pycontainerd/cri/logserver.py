"""The log writer fork server: one small resident process that forks CRI log writers.

Starting ``python -m pycontainerd.cri.logwriter`` per container costs an interpreter start
(~30 ms CPU) plus a fork of the large daemon. Instead the daemon keeps one server,
``python -m pycontainerd.cri.logserver SOCKET [--idle-exit SECONDS]`` (also reachable as
``python -m pycontainerd.cri.logwriter --serve SOCKET``), which imports little more than
the writer and forks a fresh writer child per container. Each writer is still a process of
its own, with its own pid and session, so ``ContainerStatus`` reports it, SIGUSR1 reopens
its log and SIGKILL stops it, exactly as with a directly spawned writer; the server reaps
it. The server is detached from the daemon (its own session, stdio on /dev/null) and keeps
running when the daemon stops, like the writers: the next daemon reuses it. It exits once
it has had no children and no requests for ``--idle-exit`` seconds (default 600), or when
its socket is removed or replaced — then it stops listening and lingers only to reap the
writers it still has.

Wire protocol, on a ``SOCK_SEQPACKET`` unix socket (mode 0600, same-uid peers only): one
request datagram, one answer datagram, then the connection closes. Both are JSON objects
carrying ``"v"`` (the sender's protocol version). Requests:

* ``{"v", "op": "spawn", "log_path", "max_line", "streams": ["stdout", "stderr"]}`` with
  one FIFO/pipe read end per stream attached (SCM_RIGHTS, same order). Answer
  ``{"v", "pid"}``: the writer's pid.
* ``{"v", "op": "ping"}``. Answer ``{"v", "pid", "children"}``: the server's own pid and
  how many writers it has.
* ``{"op": "quit"}`` — understood whatever the version, so that any later build can retire
  an older server: it stops listening, removes its socket and lock, answers ``{"v"}``, then
  exits once its writers have.

A request the server cannot serve, including one of another version, is answered
``{"v", "error"}``; the server goes on serving. Fds attached to a failed request are closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

from pycontainerd.cri.logwriter import run

__all__ = [
    "IDLE_EXIT_S",
    "MAX_SOCKET_PATH",
    "PROTOCOL_VERSION",
    "LogServerError",
    "VersionMismatch",
    "main",
    "ping",
    "quit_server",
    "serve",
    "spawn",
    "spawn_writer",
    "start_server",
]

PROTOCOL_VERSION = 1
IDLE_EXIT_S = 600.0
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_MAX_MSG = 65536
_MAX_FDS = 4
_STREAMS = ("stdout", "stderr")
# How often an idle server looks whether its socket is still its own.
_CHECK_S = 5.0
# How long the server waits for a slow client's request before dropping it.
_CONN_TIMEOUT_S = 5.0


class LogServerError(RuntimeError):
    """The server answered, but with an error (or with something unreadable)."""


class VersionMismatch(LogServerError):
    """The server speaks another protocol version; ``quit_server`` retires it."""


# ------------------------------------------------------------------ client


def _request(path: str, msg: dict[str, Any], fds: list[int], timeout: float) -> dict[str, Any]:
    """One request/answer exchange. OSError when nothing answers at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(path)
        data = json.dumps(msg).encode()
        if fds:
            socket.send_fds(s, [data], fds)
        else:
            s.send(data)
        reply = s.recv(_MAX_MSG)
    finally:
        s.close()
    if not reply:
        raise ConnectionResetError(f"log server at {path} closed the connection")
    try:
        answer = json.loads(reply)
    except ValueError as exc:
        raise LogServerError(f"unreadable answer from log server: {reply[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise LogServerError(f"unreadable answer from log server: {reply[:200]!r}")
    return answer


def _checked(answer: dict[str, Any]) -> dict[str, Any]:
    if answer.get("v") != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"log server speaks protocol {answer.get('v')!r}, we speak {PROTOCOL_VERSION}"
        )
    if "error" in answer:
        raise LogServerError(f"log server: {answer['error']}")
    return answer


def spawn(
    path: str, log_path: str, max_line: int, fifos: list[tuple[str, int]], timeout: float = 10.0
) -> int:
    """Ask the server at ``path`` for a writer of ``fifos`` (stream name, read-end fd) into
    ``log_path``; its pid. The caller still owns (and closes) its fds.

    OSError when no server answers (FileNotFoundError / ConnectionRefusedError: none runs),
    VersionMismatch or LogServerError when it answered with an error.
    """
    msg = {
        "v": PROTOCOL_VERSION,
        "op": "spawn",
        "log_path": log_path,
        "max_line": max_line,
        "streams": [name for name, _ in fifos],
    }
    answer = _checked(_request(path, msg, [fd for _, fd in fifos], timeout))
    pid = answer.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise LogServerError(f"log server answered without a pid: {answer!r}")
    return pid


def ping(path: str, timeout: float = 10.0) -> dict[str, Any]:
    """The server's ``{"v", "pid", "children"}``; errors as :func:`spawn`."""
    return _checked(_request(path, {"v": PROTOCOL_VERSION, "op": "ping"}, [], timeout))


def quit_server(path: str, timeout: float = 10.0) -> None:
    """Retire the server at ``path`` (any version); its socket is gone when this returns."""
    _request(path, {"v": PROTOCOL_VERSION, "op": "quit"}, [], timeout)


def start_server(path: str, idle_exit: float | None = None, timeout: float = 30.0) -> None:
    """Start a server on ``path`` and return once it listens (its first process exits
    then, leaving the detached server). Returns at once as well when another server holds
    the lock for ``path``. OSError or LogServerError when it could not be started.
    """
    import subprocess

    argv = [sys.executable, "-m", "pycontainerd.cri.logserver", path]
    if idle_exit is not None:
        argv += ["--idle-exit", repr(idle_exit)]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
        rc = proc.wait(timeout)
    except subprocess.SubprocessError as exc:  # the wait timed out
        raise LogServerError(f"log server did not start: {exc}") from exc
    if rc != 0:
        raise LogServerError(f"log server exited with status {rc} while starting")


def spawn_writer(
    path: str, log_path: str, max_line: int, fifos: list[tuple[str, int]], timeout: float = 10.0
) -> int:
    """:func:`spawn`, starting the server first when none runs (or replacing one of
    another protocol version), then retrying once. Blocking: run it in a worker thread.

    Raises OSError or LogServerError when the writer could not be had this way; the
    caller then spawns the writer itself.
    """
    try:
        return spawn(path, log_path, max_line, fifos, timeout)
    except (FileNotFoundError, ConnectionRefusedError, VersionMismatch):
        pass
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    # One starter at a time, across threads and processes (flock is per open file).
    lock = os.open(path + ".start", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return spawn(path, log_path, max_line, fifos, timeout)  # someone started it
        except VersionMismatch:
            quit_server(path, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        start_server(path)
        return spawn(path, log_path, max_line, fifos, timeout)
    finally:
        os.close(lock)


# ------------------------------------------------------------------ server


def _peer_ok(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())


def _parse_spawn(req: dict[str, Any], nfds: int) -> tuple[str, int, list[str]]:
    log_path, max_line, streams = req.get("log_path"), req.get("max_line"), req.get("streams")
    if not isinstance(log_path, str) or not os.path.isabs(log_path) or "\0" in log_path:
        raise ValueError(f"log_path must be an absolute path, not {log_path!r}")
    if isinstance(max_line, bool) or not isinstance(max_line, int) or not 0 < max_line < 2**31:
        raise ValueError(f"max_line must be a positive integer, not {max_line!r}")
    if (
        not isinstance(streams, list)
        or not 0 < len(streams) <= len(_STREAMS)
        or len(set(streams)) != len(streams)
        or any(s not in _STREAMS for s in streams)
    ):
        raise ValueError(f"streams must be distinct names out of {_STREAMS}, not {streams!r}")
    if nfds != len(streams):
        raise ValueError(f"{len(streams)} streams named but {nfds} fds attached")
    return log_path, max_line, streams


class _Server:
    def __init__(self, path: str, listener: socket.socket, lock: int, idle_exit: float) -> None:
        self.path = path
        self.listener: socket.socket | None = listener
        self.lock = lock
        self.idle_exit = idle_exit
        self.ident = os.stat(path).st_ino
        self.children: set[int] = set()
        self.sel = selectors.DefaultSelector()
        # SIGCHLD only wakes the loop (through the wakeup fd); reaping happens in the loop,
        # never inside a handler that could interrupt the bookkeeping of a fork.
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.sel.register(listener, selectors.EVENT_READ)

    def loop(self) -> None:
        idle_since = time.monotonic()
        while self.listener is not None or self.children:
            timeout = _CHECK_S
            if self.listener is not None and not self.children:
                left = self.idle_exit - (time.monotonic() - idle_since)
                timeout = max(0.0, min(_CHECK_S, left))
            for key, _ in self.sel.select(timeout):
                if key.fileobj == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 512):
                            pass
                elif self.listener is not None:
                    self._accept()
                    idle_since = time.monotonic()
            self._reap()
            if self.children:
                idle_since = time.monotonic()
            if self.listener is not None and (
                self._orphaned() or time.monotonic() - idle_since >= self.idle_exit
            ):
                self.stop_listening()

    def _reap(self) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)

    def _orphaned(self) -> bool:
        """Whether our socket was removed or replaced (the state dir was cleaned)."""
        try:
            return os.stat(self.path).st_ino != self.ident
        except OSError:
            return True

    def stop_listening(self) -> None:
        """No more requests: drop the socket (if still ours) and the lock, so a new server
        can start at once; the loop goes on only to reap the writers left."""
        if self.listener is None:
            return
        if not self._orphaned():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None
        os.close(self.lock)
        self.lock = -1

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        with conn:
            conn.settimeout(_CONN_TIMEOUT_S)
            try:
                if _peer_ok(conn):
                    self._serve_one(conn)
            except OSError:
                pass  # the client went away; nothing to answer

    def _serve_one(self, conn: socket.socket) -> None:
        msg, fds, _flags, _addr = socket.recv_fds(conn, _MAX_MSG, _MAX_FDS)
        try:
            answer = self._handle(conn, msg, fds)
        except (ValueError, TypeError, OSError) as exc:
            answer = {"error": f"bad request: {exc}"}
        finally:
            for fd in fds:  # the child has its own copies by now
                os.close(fd)
        answer["v"] = PROTOCOL_VERSION
        conn.send(json.dumps(answer).encode())

    def _handle(self, conn: socket.socket, msg: bytes, fds: list[int]) -> dict[str, Any]:
        req = json.loads(msg)
        if not isinstance(req, dict):
            raise ValueError("not a JSON object")
        op = req.get("op")
        if op == "quit":  # honoured whatever the version
            self.stop_listening()
            return {}
        if req.get("v") != PROTOCOL_VERSION:
            return {"error": f"protocol version {req.get('v')!r} not supported"}
        if op == "ping":
            return {"pid": os.getpid(), "children": len(self.children)}
        if op != "spawn":
            raise ValueError(f"unknown op {op!r}")
        log_path, max_line, streams = _parse_spawn(req, len(fds))
        pid = os.fork()
        if pid == 0:
            self._child(conn, log_path, max_line, list(zip(streams, fds, strict=True)))
        self.children.add(pid)
        return {"pid": pid}

    def _child(
        self, conn: socket.socket, log_path: str, max_line: int, fifos: list[tuple[str, int]]
    ) -> None:
        """The forked writer: shed the server's fds and signal setup, then write."""
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            conn.close()
            if self.listener is not None:
                self.listener.close()
            if self.lock >= 0:
                os.close(self.lock)
            self.sel.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            run(log_path, fifos, max_line)
            code = 0
        finally:
            os._exit(code)


def _detach() -> None:
    """Leave the starting process (which exits, telling the starter we listen)."""
    if os.fork() != 0:
        os._exit(0)
    os.setsid()  # not a group leader after the fork, so this always works
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def serve(path: str, idle_exit: float = IDLE_EXIT_S) -> int:
    """Listen on ``path`` and fork writers until idle; the exit status.

    With another server holding ``path``'s lock, returns 0 at once (that one serves).
    """
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return 0
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead server's: we hold the lock
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    listener.setblocking(False)
    _detach()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Ignored here and so in a forked writer until run() installs its reopen handler: an
    # early ReopenContainerLog must not kill a writer (nor a stray one the server).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    server = _Server(path, listener, lock, idle_exit)
    server.loop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    idle_exit = IDLE_EXIT_S
    if len(args) == 3 and args[1] == "--idle-exit":
        idle_exit = float(args[2])
        del args[1:]
    if len(args) != 1:
        print("usage: python -m pycontainerd.cri.logserver SOCKET [--idle-exit SECONDS]",
              file=sys.stderr)  # fmt: skip
        return 2
    return serve(args[0], idle_exit)


if __name__ == "__main__":
    sys.exit(main())
