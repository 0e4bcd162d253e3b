"""Where a shim listens, and the other paths derived from the daemon's address.

Light on purpose (no protobuf): the ``start`` and ``delete`` actions import only this.

* Shim socket: ``<dirname(grpc address)>/s/<sha256(grpc address + "/" + ns + "/" + group)>``,
  mode 0600 — containerd's ``SocketAddress`` (there ``/run/containerd/s/<hash>``), kept
  path-based (no abstract sockets) and short enough for the 108-byte limit.
* runc state root: ``<dirname(grpc address)>/runc`` (+ ``/<namespace>``), which is
  ``/run/containerd/runc/<ns>`` under containerd, as its own shim uses; ``Options.root``
  overrides the base.
* Zygote socket: ``<dirname(grpc address)>/s/pyrunc-zygote``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket

__all__ = [
    "GROUP_LABELS",
    "can_connect",
    "group_id",
    "read_address",
    "remove_socket",
    "runc_root",
    "socket_address",
    "state_dir",
    "write_address",
    "zygote_path",
]

DEFAULT_STATE = "/run/pycontainerd"
GROUP_LABELS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")


def _strip(address: str) -> str:
    return address.removeprefix("unix://")


def state_dir(grpc_address: str) -> str:
    """The directory beside the daemon's socket that holds ``s/`` and ``runc/``."""
    path = _strip(grpc_address)
    return os.path.dirname(path) if path else DEFAULT_STATE


def socket_address(grpc_address: str, namespace: str, group: str) -> str:
    """``unix://`` address of the shim serving ``group`` (a container id or a group id)."""
    digest = hashlib.sha256(f"{grpc_address}/{namespace}/{group}".encode()).hexdigest()
    return "unix://" + os.path.join(state_dir(grpc_address), "s", digest)


def runc_root(grpc_address: str) -> str:
    return os.path.join(state_dir(grpc_address), "runc")


def zygote_path(grpc_address: str) -> str:
    return os.path.join(state_dir(grpc_address), "s", "pyrunc-zygote")


def group_id(bundle: str, id: str) -> str:
    """The grouping annotation of the bundle's config (containerd's runc.v2 rule), or ``id``."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return id
    annotations = spec.get("annotations") or {}
    for label in GROUP_LABELS:
        if annotations.get(label):
            return str(annotations[label])
    return id


def can_connect(address: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(_strip(address))
    except OSError:
        return False
    finally:
        s.close()
    return True


def remove_socket(address: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_strip(address))


def write_address(bundle: str, address: str) -> None:
    """Write ``<bundle>/address`` atomically (containerd reads it to reconnect)."""
    tmp = os.path.join(bundle, ".address.tmp")
    with open(tmp, "w") as f:
        f.write(address)
    os.rename(tmp, os.path.join(bundle, "address"))


def read_address(bundle: str) -> str:
    try:
        with open(os.path.join(bundle, "address")) as f:
            return f.read().strip()
    except OSError:
        return ""


def listen(address: str) -> socket.socket | None:
    """Bind and listen on a new shim socket (0600); None if a live shim already serves it."""
    path = _strip(address)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            if can_connect(address):
                return None
            remove_socket(address)
            continue
        # No umask games (the daemon is threaded); the 0700 directory covers the gap.
        os.chmod(path, 0o600)
        sock.listen(128)
        return sock
    raise OSError(98, f"cannot bind shim socket {path}")
