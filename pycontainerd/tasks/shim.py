"""One shim, from the daemon's side: the runtime v2 ``start``/``delete`` binary protocol,
and task calls over its ttrpc socket.

``start`` runs ``containerd-shim-<name>-<version> -namespace NS -address GRPC
-publish-binary P -id ID start`` in the bundle directory with ``TTRPC_ADDRESS`` in the
environment and the runtime options (a serialized Any) on stdin; the shim prints the
address of the server it left running. ``delete`` is the same command line with
``-bundle`` and ``delete``, run when the shim is gone; it prints a
``containerd.task.v2.DeleteResponse``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from typing import TYPE_CHECKING, TypeVar

from pycontainerd import ttrpc
from pycontainerd.api.runtime.task.v2 import shim_pb2
from pycontainerd.errdefs import NotFound, PycdError, Unavailable
from pycontainerd.namespaces import NAMESPACE_TTRPC_HEADER

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from pycontainerd.tasks.bundle import Bundle

log = logging.getLogger(__name__)

TASK_SERVICE = "containerd.task.v2.Task"
START_TIMEOUT = 30.0
DELETE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0

M = TypeVar("M", bound="Message")


def binary_name(runtime: str) -> str:
    """``io.containerd.runc.v2`` → ``containerd-shim-runc-v2`` (empty if malformed)."""
    parts = runtime.split(".")
    if len(parts) < 2 or not all(parts[-2:]):
        return ""
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


def find_binary(runtime: str, configured: dict[str, str]) -> str:
    """The shim binary for ``runtime``: configured path, else ``containerd-shim-*`` on PATH."""
    if runtime in configured:
        return configured[runtime]
    if os.path.isabs(runtime) and os.access(runtime, os.X_OK):
        return runtime
    name = binary_name(runtime)
    if not name:
        raise PycdError(
            f"invalid runtime name {runtime!r}, correct runtime name should be either format"
            " like `io.containerd.runc.v1` or a full path to the binary"
        )
    path = shutil.which(name)
    if path is None:
        # Next to our own executables (a venv's bin directory is not always on PATH).
        local = os.path.join(os.path.dirname(sys.executable), name)
        if os.access(local, os.X_OK):
            return local
        raise PycdError(f"runtime {runtime!r} binary not installed {name!r}: file does not exist")
    return path


def _command(
    binary: str, bundle: Bundle, grpc_address: str, publish: str, *extra: str
) -> list[str]:
    return [
        binary,
        "-namespace",
        bundle.namespace,
        "-address",
        grpc_address,
        "-publish-binary",
        publish,
        "-id",
        bundle.id,
        *extra,
    ]


async def run_start(
    binary: str,
    bundle: Bundle,
    grpc_address: str,
    ttrpc_address: str,
    publish: str,
    options: bytes,
    debug: bool = False,
) -> str:
    """Run the shim's ``start`` command; returns the address it printed."""
    args = ["-debug"] if debug else []
    proc = await asyncio.create_subprocess_exec(
        *_command(binary, bundle, grpc_address, publish, *args, "start"),
        cwd=bundle.path,
        env={**os.environ, "TTRPC_ADDRESS": ttrpc_address, "GOMAXPROCS": "2"},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(options), START_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Unavailable(f"shim {binary} start timed out") from None
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise PycdError(f"start failed: {text}: exit status {proc.returncode}")
    return text.splitlines()[-1].strip() if text else ""


async def run_delete(
    binary: str, bundle: Bundle, grpc_address: str, ttrpc_address: str, publish: str
) -> shim_pb2.DeleteResponse:
    """Run the shim's ``delete`` command (cleanup after a dead shim)."""
    proc = await asyncio.create_subprocess_exec(
        *_command(binary, bundle, grpc_address, publish, "-bundle", str(bundle.path), "delete"),
        cwd=bundle.path,
        env={**os.environ, "TTRPC_ADDRESS": ttrpc_address},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DELETE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Unavailable(f"shim {binary} delete timed out") from None
    if proc.returncode != 0:
        raise PycdError(f"{err.decode(errors='replace').strip()}: exit status {proc.returncode}")
    resp = shim_pb2.DeleteResponse()
    resp.ParseFromString(out)
    return resp


class Shim:
    """A connected shim: ttrpc calls into ``containerd.task.v2.Task``."""

    def __init__(self, bundle: Bundle, client: ttrpc.Client, binary: str, address: str) -> None:
        self.bundle = bundle
        self.client = client
        self.binary = binary
        self.address = address
        self._md = ((NAMESPACE_TTRPC_HEADER, bundle.namespace),)

    @classmethod
    async def connect(
        cls, bundle: Bundle, binary: str, address: str, timeout_s: float = CONNECT_TIMEOUT
    ) -> Shim:
        if not address:
            raise Unavailable("shim printed no address")
        client = await ttrpc.Client.connect(address, timeout_s=timeout_s)
        return cls(bundle, client, binary, address)

    async def call(
        self, method: str, request: Message, response_type: type[M], timeout_s: float | None = None
    ) -> M:
        try:
            return await self.client.call(
                TASK_SERVICE, method, request, response_type, timeout_s=timeout_s, metadata=self._md
            )
        except ttrpc.TTRPCError as exc:
            # The shim went away mid-call: the task is as good as gone (containerd: NotFound).
            raise NotFound(f"shim of task {self.bundle.id} disconnected: {exc}") from exc

    async def close(self) -> None:
        await self.client.close()
