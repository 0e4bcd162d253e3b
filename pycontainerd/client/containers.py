"""Containers: create from an image (snapshot + spec + record), tasks, and delete.

``create_container`` does what ``ctr run`` does before the task: resolve the image for
this host (unpacking it if needed), ``Snapshots.Prepare`` a writable snapshot named
after the container on the image's top chain ID, build the OCI spec client-side, and
``Containers.Create`` — all under one lease, so the snapshot cannot be collected
before the container record references it. A user name in the image config or the
options is looked up in the image's own ``/etc/passwd``: the client mounts a
read-only view of the image for that (same host as the daemon, root needed) and reads
the files without following symlinks out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2

from pycontainerd.api.services.containers.v1 import containers_pb2
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2
from pycontainerd.api.services.tasks.v1 import tasks_pb2
from pycontainerd.client._client import RawClient
from pycontainerd.client.images import unpack
from pycontainerd.client.spec import SPEC_TYPE_URL, UserDB, generate_spec
from pycontainerd.client.tasks import Task
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument, NotFound, PycdError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pycontainerd.api.types import mount_pb2
    from pycontainerd.client._sdk import Client
    from pycontainerd.client.cio import TaskIO
    from pycontainerd.client.spec import Mount, Resources

__all__ = ["Container", "create_container"]

RUNC_V2 = "io.containerd.runc.v2"
STOP_SIGNAL_LABEL = "io.containerd.image.config.stop-signal"
MAX_ETC_FILE = 1 << 20


@dataclass(slots=True)
class Container:
    """A container record; ``new_task`` / ``task`` give its init process."""

    client: RawClient
    id: str
    image: str
    spec: dict[str, Any]
    snapshotter: str
    snapshot_key: str
    runtime: str
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, client: RawClient, pb: containers_pb2.Container) -> Container:
        try:
            spec = json.loads(pb.spec.value) if pb.spec.value else {}
        except ValueError as exc:
            raise InvalidArgument(f"container {pb.id}: spec is not JSON") from exc
        return cls(
            client, pb.id, pb.image, spec, pb.snapshotter, pb.snapshot_key,
            pb.runtime.name, dict(pb.labels),
        )  # fmt: skip

    async def rootfs(self) -> list[mount_pb2.Mount]:
        resp = await self.client.call(
            self.client.snapshots_stub.Mounts,
            snapshots_pb2.MountsRequest(snapshotter=self.snapshotter, key=self.snapshot_key),
        )
        return list(resp.mounts)

    async def new_task(self, io: TaskIO | None = None) -> Task:
        """``Tasks.Create`` with the snapshot's mounts and ``io``'s FIFO paths."""
        req = tasks_pb2.CreateTaskRequest(
            container_id=self.id,
            rootfs=await self.rootfs(),
            terminal=bool(io and io.terminal),
            stdin=io.stdin_path if io else "",
            stdout=io.stdout_path if io else "",
            stderr=io.stderr_path if io else "",
        )
        try:
            resp = await self.client.call(self.client.tasks_stub.Create, req)
        except BaseException:
            if io is not None:
                await io.close(grace=0)
            raise
        return Task(self.client, self.id, resp.pid, io, self.spec)

    async def task(self, io: TaskIO | None = None) -> Task:
        """The existing task (NotFound when there is none)."""
        resp = await self.client.call(
            self.client.tasks_stub.Get, tasks_pb2.GetRequest(container_id=self.id)
        )
        return Task(self.client, self.id, resp.process.pid, io, self.spec)

    async def delete(self, *, snapshot_cleanup: bool = True) -> None:
        """Remove the record (and its snapshot); FailedPrecondition while a task exists."""
        try:
            status = await (await self.task()).status()
        except NotFound:
            status = ""
        if status:
            raise FailedPrecondition(f"container {self.id} still has a task ({status})")
        if snapshot_cleanup and self.snapshot_key:
            with contextlib.suppress(NotFound):
                await self.client.call(
                    self.client.snapshots_stub.Remove,
                    snapshots_pb2.RemoveSnapshotRequest(
                        snapshotter=self.snapshotter, key=self.snapshot_key
                    ),
                )
        await self.client.call(
            self.client.containers_stub.Delete,
            containers_pb2.DeleteContainerRequest(id=self.id),
        )


async def create_container(
    client: Client,
    container_id: str,
    image: str,
    *,
    args: Sequence[str] | None = None,
    env: Sequence[str] = (),
    cwd: str | None = None,
    mounts: Sequence[Mount] = (),
    tty: bool = False,
    user: str | None = None,
    hostname: str | None = None,
    resources: Resources | None = None,
    privileged: bool = False,
    network: str = "none",
    runtime: str = RUNC_V2,
    snapshotter: str | None = None,
    labels: dict[str, str] | None = None,
) -> Container:
    img = await client.get_image(image)
    snap = snapshotter or await client.default_snapshotter()
    async with client.lease():
        resolved = await client.images.resolve(img)
        chain = await unpack(client, client.images, img, snap)
        cfg = resolved.runtime_config
        wanted = user if user is not None else str(cfg.get("User") or "")
        userdb = await _image_userdb(client, snap, chain) if wanted else None
        spec = generate_spec(
            client.namespace, container_id, cfg, args=args, env=env, cwd=cwd, user=user,
            userdb=userdb, mounts=mounts, tty=tty, hostname=hostname, resources=resources,
            privileged=privileged, network=network,
        )  # fmt: skip
        await client.call(
            client.snapshots_stub.Prepare,
            snapshots_pb2.PrepareSnapshotRequest(snapshotter=snap, key=container_id, parent=chain),
        )
        lbls = {STOP_SIGNAL_LABEL: str(cfg.get("StopSignal") or "SIGTERM"), **(labels or {})}
        record = containers_pb2.Container(
            id=container_id,
            labels=lbls,
            image=img.name,
            runtime=containers_pb2.Container.Runtime(
                name=runtime, options=any_pb2.Any(type_url="containerd.runc.v1.Options")
            ),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(spec).encode()),
            snapshotter=snap,
            snapshot_key=container_id,
        )
        try:
            resp = await client.call(
                client.containers_stub.Create,
                containers_pb2.CreateContainerRequest(container=record),
            )
        except PycdError:
            with contextlib.suppress(PycdError):
                await client.call(
                    client.snapshots_stub.Remove,
                    snapshots_pb2.RemoveSnapshotRequest(snapshotter=snap, key=container_id),
                )
            raise
    return Container.from_pb(client, resp.container)


# ---------------------------------------------------------------------------- /etc/passwd


async def _image_userdb(client: Client, snapshotter: str, chain: str) -> UserDB:
    key = f"userdb-{time.time_ns()}-{secrets.token_hex(4)}"
    resp = await client.call(
        client.snapshots_stub.View,
        snapshots_pb2.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=chain),
    )
    try:
        mounts = [(m.type, m.source, list(m.options)) for m in resp.mounts]
        passwd, group = await asyncio.to_thread(_read_etc, mounts)
    finally:
        with contextlib.suppress(PycdError):
            await client.call(
                client.snapshots_stub.Remove,
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
            )
    return UserDB(passwd, group)


_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_BIND, MS_REC = 1, 4096, 16384


def _mount(typ: str, source: str, target: str, options: list[str]) -> None:
    flags = MS_RDONLY if "ro" in options else 0
    data = [o for o in options if o not in ("ro", "rw", "bind", "rbind")]
    if typ == "bind" or "bind" in options or "rbind" in options:
        flags = MS_BIND | (MS_REC if "rbind" in options else 0)
        typ, data = "", []
    rc = _libc.mount(
        source.encode(), target.encode(), typ.encode() or None, flags, ",".join(data).encode()
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise FailedPrecondition(f"mount {typ or 'bind'} {source}: {os.strerror(err)}")


def _read_etc(mounts: list[tuple[str, str, list[str]]]) -> tuple[str, str]:
    if len(mounts) != 1:
        raise FailedPrecondition(f"cannot read the image's /etc/passwd: {len(mounts)} mounts")
    typ, source, options = mounts[0]
    target = tempfile.mkdtemp(prefix="pcd-userdb-")
    try:
        _mount(typ, source, target, options)
        try:
            return _read_in_root(target, "passwd"), _read_in_root(target, "group")
        finally:
            _libc.umount2(target.encode(), 2)  # MNT_DETACH
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(target)


def _read_in_root(root: str, name: str) -> str:
    """``<root>/etc/<name>`` with no symlink followed (absent or a link: empty)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        etc = os.open("etc", flags | os.O_DIRECTORY, dir_fd=root_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return ""
        raise
    finally:
        os.close(root_fd)
    try:
        fd = os.open(name, flags, dir_fd=etc)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            return ""
        raise
    finally:
        os.close(etc)
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_ETC_FILE).decode(errors="replace")
