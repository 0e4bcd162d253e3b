"""Start a shim server for a container: the daemon's in-process API and the ``start`` action.

``start_shim`` does what ``containerd-shim-pyrunc-v1 start`` does, without an interpreter
start: find the socket address (a live shim of the same group is reused), bind and listen
on it, write ``<bundle>/address``, and hand the socket to the zygote, which forks a
detached server. The zygote is started on first use and reused; when it cannot be reached
the server is spawned as ``python -m pycontainerd.shim ... serve`` with the socket as fd 3.
Since the socket listens before this returns, the caller can connect at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from pycontainerd.shim import address, zygote

if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping

__all__ = ["start_shim", "start_shim_sync"]

# logging and subprocess are imported where used: the ``start`` action runs this module
# in a fresh interpreter on every container start, and their import is most of its cost.

_zygote_lock = threading.Lock()
# Set PYCONTAINERD_SHIM_ZYGOTE=0 to always spawn a fresh interpreter per shim.
_ENV_ZYGOTE = "PYCONTAINERD_SHIM_ZYGOTE"
# How many shim sockets (container groups) one shim process may serve: memory per
# container against blast radius. 1 gives containerd's one process per shim.
_ENV_PER_PROCESS = "PYCONTAINERD_SHIM_MAX_PER_PROCESS"
DEFAULT_PER_PROCESS = 16
SOCKET_FD_ENV = "PYCONTAINERD_SHIM_SOCKET_FD"


def _spawn_zygote(path: str, env: Mapping[str, str]) -> None:
    """Start a zygote on ``path`` and wait until it listens (it detaches itself)."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "pycontainerd.shim.zygote", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(env),
        start_new_session=True,
        close_fds=True,
    )
    proc.wait(timeout=30)  # the first process exits once the socket listens


def _via_zygote(
    path: str, payload: dict[str, object], sock: socket.socket, env: Mapping[str, str]
) -> int:
    try:
        return zygote.request(path, payload, sock.fileno())
    except OSError:
        pass
    with _zygote_lock:
        try:
            return zygote.request(path, payload, sock.fileno())
        except OSError:
            _spawn_zygote(path, env)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                return zygote.request(path, payload, sock.fileno())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def _spawn_serve(
    namespace: str,
    id: str,
    bundle: str,
    grpc_address: str,
    debug: bool,
    sock: socket.socket,
    env: Mapping[str, str],
) -> int:
    """Fallback: a fresh interpreter serving on the inherited socket (fd in the env)."""
    import subprocess

    argv = [sys.executable, "-m", "pycontainerd.shim", "-namespace", namespace, "-id", id]
    argv += ["-address", grpc_address, "-bundle", bundle]
    if debug:
        argv.append("-debug")
    argv.append("serve")
    child_env = dict(env)
    child_env[SOCKET_FD_ENV] = str(sock.fileno())
    proc = subprocess.Popen(
        argv,
        cwd=bundle,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        pass_fds=(sock.fileno(),),
    )
    # Not waited for: it serves until Shutdown. Popen reaps it if it is collected first.
    return proc.pid


def start_shim_sync(
    namespace: str,
    id: str,
    bundle: str,
    grpc_address: str,
    ttrpc_address: str,
    options: bytes = b"",
    debug: bool = False,
    env: Mapping[str, str] | None = None,
) -> str:
    """Blocking body of :func:`start_shim` (the ``start`` action calls it directly)."""
    group = address.group_id(bundle, id)
    addr = address.socket_address(grpc_address, namespace, group)
    sock = address.listen(addr)
    if sock is None:  # a live shim already serves this group
        address.write_address(bundle, addr)
        return addr
    try:
        address.write_address(bundle, addr)
        full_env = dict(os.environ if env is None else env)
        full_env["TTRPC_ADDRESS"] = ttrpc_address
        config = {
            "namespace": namespace,
            "id": id,
            "bundle": bundle,
            "grpc_address": grpc_address,
            "ttrpc_address": ttrpc_address,
            "socket_address": addr,
            "debug": debug,
        }
        cgroup = _shim_cgroup(options)
        request = {
            "config": config,
            "env": full_env,
            "max_per_process": int(full_env.get(_ENV_PER_PROCESS, DEFAULT_PER_PROCESS)),
            # A shim cgroup applies to the whole process: such a shim gets its own.
            "dedicated": bool(cgroup),
        }
        pid = 0
        if full_env.get(_ENV_ZYGOTE, "1") != "0":
            try:
                pid = _via_zygote(address.zygote_path(grpc_address), request, sock, full_env)
            except Exception as exc:  # OSError, RuntimeError, SubprocessError, timeouts
                import logging

                logging.getLogger(__name__).warning(
                    "shim zygote unavailable, spawning a server: %s", exc
                )
        if not pid:
            pid = _spawn_serve(namespace, id, bundle, grpc_address, debug, sock, full_env)
        if cgroup:
            _join_cgroup(pid, cgroup)
    except BaseException:
        address.remove_socket(addr)
        raise
    finally:
        sock.close()
    return addr


def _shim_cgroup(options: bytes) -> str:
    """``Options.shim_cgroup`` of the start-time runtime options (the only one used here)."""
    if not options:
        return ""
    from google.protobuf import any_pb2

    from pycontainerd.api.runtime.runc.options import oci_pb2

    any_msg = any_pb2.Any.FromString(options)
    if not any_msg.type_url.endswith(".Options"):
        return ""
    return oci_pb2.Options.FromString(any_msg.value).shim_cgroup


def _join_cgroup(pid: int, path: str) -> None:
    root = "/sys/fs/cgroup"
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        dirs = [os.path.join(root, path.lstrip("/"))]
    else:
        dirs = [os.path.join(root, h, path.lstrip("/")) for h in os.listdir(root)]
    for d in dirs:
        if os.path.isdir(d):
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(pid))


async def start_shim(
    namespace: str,
    id: str,
    bundle: str,
    grpc_address: str,
    ttrpc_address: str,
    options: bytes = b"",
    debug: bool = False,
) -> str:
    """Start (or reuse) the shim for container ``id``; return its ``unix://`` address.

    ``options`` is the serialized runtime options ``Any`` (as ``start`` reads on stdin).
    Raises OSError/RuntimeError when no server could be started.
    """
    import asyncio

    return await asyncio.to_thread(
        start_shim_sync, namespace, id, bundle, grpc_address, ttrpc_address, options, debug
    )
