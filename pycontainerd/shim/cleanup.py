"""The ``delete`` action: clean up after a shim that died (containerd's ``manager.Stop``).

Force-deletes the runc container (its processes die with it), unmounts ``<bundle>/rootfs``,
removes the shim socket if no live shim answers on it, and returns a serialized
``DeleteResponse`` with the init pid, exit status 137 (SIGKILL) and the current time.
The runc root and binary come from ``<bundle>/options.json``, written at Create.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from google.protobuf import timestamp_pb2

from pycontainerd.api.runtime.task.v2 import shim_pb2
from pycontainerd.errdefs import PycdError
from pycontainerd.runtime.runc import Runc, is_not_exist
from pycontainerd.shim import address
from pycontainerd.shim.container import INIT_PID_FILE, read_options
from pycontainerd.snapshots.mount import unmount_all

__all__ = ["cleanup"]

log = logging.getLogger(__name__)


def cleanup(namespace: str, id: str, bundle: str, grpc_address: str = "") -> bytes:
    opts = read_options(bundle)
    root = opts.root or address.runc_root(grpc_address)
    runc = Runc(
        os.path.join(root, namespace),
        binary=opts.binary_name,
        log=os.path.join(bundle, "log.json"),
        systemd_cgroup=opts.systemd_cgroup,
    )
    try:
        asyncio.run(runc.delete(id, force=True))
    except (PycdError, OSError) as exc:
        if not is_not_exist(exc):
            log.warning("runc delete %s: %s", id, exc)
    try:
        unmount_all(os.path.join(bundle, "rootfs"))
    except OSError as exc:
        log.warning("unmount rootfs of %s: %s", id, exc)
    addr = address.read_address(bundle)
    if addr and not address.can_connect(addr):
        address.remove_socket(addr)
    pid = 0
    try:
        with open(os.path.join(bundle, INIT_PID_FILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    resp = shim_pb2.DeleteResponse(pid=pid, exit_status=128 + signal.SIGKILL, exited_at=ts)
    return resp.SerializeToString()
