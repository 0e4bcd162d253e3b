"""The zygote: a pre-loaded process that forks shim servers, so no shim pays Python's start-up.

``python -m pycontainerd.shim.zygote PATH`` detaches (fork, the parent exits), takes a lock
beside ``PATH`` (one zygote per daemon state dir), listens on ``PATH`` (SOCK_SEQPACKET,
mode 0600, same-user peers only), imports the shim server and freezes the heap
(``gc.freeze``: forked shims then share those pages instead of copying them).

A request is one datagram: JSON ``{"config": {...ShimConfig}, "env": {...},
"max_per_process": K, "dedicated": bool}`` with the shim's listening socket attached
(SCM_RIGHTS); the answer is ``{"pid": N}`` or ``{"error": "..."}``.

Shim processes are shared to keep memory per container low: a request first goes to a
running shim process (same environment, fewer than K sockets) over the channel the zygote
kept to it; the process serves the new socket as a separate shim (see
``pycontainerd.shim.server.Host``). Otherwise — or for a ``dedicated`` request — the zygote
(single-threaded, so fork is safe) forks a child that starts a new session and forks the
new shim process, reports its pid and exits: the shim is reparented away from the zygote.
Nothing here is needed for correctness: callers fall back to spawning
``python -m pycontainerd.shim ... serve``.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

__all__ = ["MAX_REQUEST", "main", "request"]

MAX_REQUEST = 1 << 20
# The zygote exits when unused this long (the next start brings it back), or as soon as
# its socket disappears.
IDLE_EXIT_S = 600.0
_CHECK_S = 5.0


def _peer_ok(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid() and gid == os.getegid())


def request(path: str, payload: dict[str, Any], fd: int, timeout_s: float = 10.0) -> int:
    """Ask the zygote at ``path`` to fork a shim serving on ``fd``; return its pid.

    OSError when no zygote answers (the caller falls back), RuntimeError when it failed.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.settimeout(timeout_s)
        s.connect(path)
        data = json.dumps(payload).encode()
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        reply = s.recv(65536)
    finally:
        s.close()
    if not reply:
        raise OSError("zygote closed the connection")
    answer = json.loads(reply)
    if "error" in answer:
        raise RuntimeError(f"zygote: {answer['error']}")
    return int(answer["pid"])


class _HostRef:
    """The zygote's channel to a shim process that may take more sockets."""

    def __init__(self, channel: socket.socket, env_key: str) -> None:
        self.channel = channel
        self.env_key = env_key


_hosts: list[_HostRef] = []
# A forked, idle shim process waiting for its first socket: takes the fork off the hot path.
_spare: list[socket.socket] = []


def _env_key(env: dict[str, str] | None) -> str:
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()


def _offer(host: _HostRef, msg: bytes, fd: int) -> int | None:
    """Ask a running shim process to take this socket: its pid, or None (full or gone)."""
    try:
        host.channel.settimeout(5.0)
        host.channel.sendmsg(
            [msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        )
        reply = host.channel.recv(65536)
        answer = json.loads(reply) if reply else {}
    except (OSError, ValueError):
        answer = {}
    if "pid" in answer:
        return int(answer["pid"])
    if not answer.get("full"):  # gone or broken: forget it
        _hosts.remove(host)
        host.channel.close()
    return None


def _fork_host(
    conn: socket.socket, listener: socket.socket, req: dict[str, Any], shim_sock: socket.socket
) -> None:
    from pycontainerd.shim.server import ShimConfig, run_detached

    cfg = ShimConfig(**req["config"])
    env = req.get("env")
    max_endpoints = 1 if req.get("dedicated") else int(req.get("max_per_process") or 1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            server = os.fork()
            if server == 0:
                listener.close()
                conn.close()
                ours.close()
                run_detached(cfg, shim_sock, env, theirs, max_endpoints)
            conn.send(json.dumps({"pid": server}).encode())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"error": str(exc)}).encode())
        finally:
            os._exit(0)
    theirs.close()
    os.waitpid(child, 0)
    if max_endpoints > 1:
        _hosts.append(_HostRef(ours, _env_key(env)))
    else:
        ours.close()


def _fork_spare(listener: socket.socket) -> None:
    from pycontainerd.shim.server import run_spare

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                listener.close()
                ours.close()
                for h in _hosts:
                    h.channel.close()
                run_spare(theirs)
        finally:
            os._exit(0)
    theirs.close()
    os.waitpid(child, 0)
    _spare.append(ours)


def _to_spare(req: dict[str, Any], fd: int) -> int | None:
    while _spare:
        channel = _spare.pop()
        host = _HostRef(channel, _env_key(req.get("env")))
        _hosts.append(host)
        max_endpoints = 1 if req.get("dedicated") else int(req.get("max_per_process") or 1)
        offer = {"config": req["config"], "env": req.get("env"), "max_per_process": max_endpoints}
        pid = _offer(host, json.dumps(offer).encode(), fd)
        if max_endpoints == 1 and host in _hosts:
            _hosts.remove(host)
            host.channel.close()
        if pid is not None:
            return pid
    return None


def _serve_one(conn: socket.socket, listener: socket.socket) -> None:
    msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 4)
    if not fds:
        conn.send(json.dumps({"error": "no socket attached"}).encode())
        return
    for extra in fds[1:]:
        os.close(extra)
    shim_sock = socket.socket(fileno=fds[0])
    try:
        req = json.loads(msg)
        if not req.get("dedicated"):
            key = _env_key(req.get("env"))
            offer = json.dumps({"config": req["config"]}).encode()
            for host in [h for h in reversed(_hosts) if h.env_key == key]:
                pid = _offer(host, offer, shim_sock.fileno())
                if pid is not None:
                    conn.send(json.dumps({"pid": pid}).encode())
                    return
        pid = _to_spare(req, shim_sock.fileno())
        if pid is not None:
            conn.send(json.dumps({"pid": pid}).encode())
        else:
            _fork_host(conn, listener, req, shim_sock)
    except (ValueError, KeyError, TypeError) as exc:
        conn.send(json.dumps({"error": f"bad request: {exc}"}).encode())
    finally:
        shim_sock.close()


def _take_lock(lock: int, path: str) -> bool:
    """Own the directory's lock; False when a live zygote serves it.

    A zygote whose socket was removed (a restarted daemon retires the old one) notices
    only at its next check, up to ``_CHECK_S`` later: until then it holds the lock, and
    its successor would be refused while the daemon waits for a socket that never
    comes. So a holder without a socket is asked to go (SIGTERM; its shims are separate
    processes) and the lock awaited briefly.
    """
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    if os.path.exists(path):
        return False
    with contextlib.suppress(ValueError, OSError):
        pid = int(os.pread(lock, 32, 0).decode().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            is_zygote = b"pycontainerd.shim.zygote" in f.read()
        if pid > 0 and is_zygote:  # never a recycled pid of something else
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 2 * _CHECK_S
    while time.monotonic() < deadline:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.01)
    return False


def _orphaned(path: str, ident: int) -> bool:
    """Whether our socket was removed or replaced (the daemon's state dir was cleaned)."""
    try:
        return os.stat(path).st_ino != ident
    except OSError:
        return True


def _detach(lock: int) -> None:
    child = os.fork()
    if child != 0:
        # The pid goes into the lock file before the caller sees us exit, so a reader
        # (a successor to hurry us out, a test) never finds it missing. One fixed-width
        # write, no truncation first: no moment shows an empty or half-written pid.
        os.pwrite(lock, f"{child:<12}".encode(), 0)
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m pycontainerd.shim.zygote SOCKET", file=sys.stderr)
        return 2
    path = args[0]
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if not _take_lock(lock, path):
        return 0  # another zygote owns this directory
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    _detach(lock)  # writes our pid to the lock file, for a successor to hurry us out
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Everything a shim needs, imported once; frozen so children don't copy it for GC.
    from pycontainerd.shim import _nogrpc

    _nogrpc.install()
    import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread imports it lazily

    import pycontainerd.shim.server  # noqa: F401

    gc.collect()
    gc.freeze()
    listener.settimeout(_CHECK_S)
    ident = os.stat(path).st_ino
    idle_since = time.monotonic()
    while True:
        if not _spare:
            with contextlib.suppress(OSError):
                _fork_spare(listener)
        try:
            conn, _ = listener.accept()
        except (InterruptedError, TimeoutError):
            if _orphaned(path, ident) or time.monotonic() - idle_since > IDLE_EXIT_S:
                break
            continue
        idle_since = time.monotonic()
        with conn:
            try:
                if _peer_ok(conn):
                    _serve_one(conn, listener)
            except OSError:
                pass
    if not _orphaned(path, ident):
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
