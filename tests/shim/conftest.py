"""Shim test fixtures: a busybox rootfs, bundles, client FIFOs, an events sink, shim clients.

Everything runs for real: runc, overlay mounts, FIFOs, ttrpc over unix sockets. Paths live
in a short directory under /tmp (unix socket paths are limited to 108 bytes). The "daemon"
here is only an address: the shim derives its socket dir (``s/``) and runc root (``runc/``)
from the directory of the gRPC address, and forwards events to ``<address>.ttrpc``, where
the test serves ``Events/Forward`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pycontainerd import typeurl
from pycontainerd.api.runtime.task.v2 import shim_pb2 as api
from pycontainerd.api.services.ttrpc.events.v1 import events_pb2
from pycontainerd.api.types import mount_pb2
from pycontainerd.archive.tar import apply_layer
from pycontainerd.shim import address, launcher
from pycontainerd.ttrpc import Client, Method, Server
from tests.support.images import busybox_image

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping

M = TypeVar("M", bound=Message)
NS = "testns"
SERVICE = "containerd.task.v2.Task"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("runc") is None:
        return "needs runc"
    if not Path("/bin/busybox").is_file():
        return "needs /bin/busybox (busybox-static)"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "needs overlayfs"
    return None


SKIP = _skip_reason()
requires_runc = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


@pytest.fixture(scope="session")
def busybox_rootfs() -> Iterator[Path]:
    if SKIP is not None:
        pytest.skip(SKIP)
    d = Path(tempfile.mkdtemp(prefix="shimfs-", dir="/tmp"))
    apply_layer(d, io.BytesIO(busybox_image().layers[0].tar_bytes()), overlay=False)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def base_spec() -> dict[str, Any]:
    if SKIP is not None:
        pytest.skip(SKIP)
    d = tempfile.mkdtemp(prefix="spec-", dir="/tmp")
    try:
        subprocess.run(["runc", "spec"], cwd=d, check=True)
        spec: dict[str, Any] = json.loads(Path(d, "config.json").read_text())
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return spec


class EventSink:
    """``Events/Forward`` on ``<grpc address>.ttrpc``: collects the envelopes."""

    def __init__(self) -> None:
        self.envelopes: list[events_pb2.Envelope] = []
        self.changed = asyncio.Condition()
        self.server = Server()
        self.server.register(
            "containerd.services.events.ttrpc.v1.Events",
            {"Forward": Method(events_pb2.ForwardRequest, self._forward)},
        )

    async def _forward(self, req: events_pb2.ForwardRequest, md: Mapping[str, str]) -> Message:
        async with self.changed:
            self.envelopes.append(req.envelope)
            self.changed.notify_all()
        return empty_pb2.Empty()

    def topics(self, container_id: str | None = None) -> list[str]:
        out = []
        for e in self.envelopes:
            ev = typeurl.unpack(e.event)
            if container_id is None or getattr(ev, "container_id", None) == container_id:
                out.append(e.topic)
        return out

    async def wait_for(self, topic: str, container_id: str, count: int = 1) -> list[Message]:
        def matches() -> list[Message]:
            found = []
            for e in self.envelopes:
                ev = typeurl.unpack(e.event)
                if e.topic == topic and getattr(ev, "container_id", None) == container_id:
                    found.append(ev)
            return found

        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(matches()) >= count), 20)
        return matches()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FifoReader:
    """The client's side of an output FIFO (like ctr's copier): collects data until EOF."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path, 0o700)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = bytearray()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self.fd)
            while True:
                try:
                    chunk = os.read(self.fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    return bytes(self.data)
                self.data += chunk

    async def eof(self) -> bytes:
        return await asyncio.wait_for(asyncio.shield(self.task), 20)

    def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class ShimEnv:
    base: Path
    rootfs: Path
    spec: dict[str, Any]
    events: EventSink
    clients: list[Client] = field(default_factory=list)
    readers: list[FifoReader] = field(default_factory=list)

    @property
    def grpc_address(self) -> str:
        return str(self.base / "d.sock")

    @property
    def ttrpc_address(self) -> str:
        return self.grpc_address + ".ttrpc"

    def bundle(
        self,
        id: str,
        args: list[str],
        *,
        terminal: bool = False,
        spec: dict[str, Any] | None = None,
    ) -> Path:
        b = self.base / "b" / id
        b.mkdir(parents=True)
        cfg = json.loads(json.dumps(spec or self.spec))
        cfg["process"]["args"] = args
        cfg["process"]["terminal"] = terminal
        cfg["root"] = {"path": "rootfs", "readonly": False}
        cfg["hostname"] = id
        # runc's default cgroup is /<id>: keep concurrent test runs apart.
        cfg["linux"]["cgroupsPath"] = f"/pcd-shim-tests/{self.base.name}-{id}"
        (b / "config.json").write_text(json.dumps(cfg))
        return b

    def rootfs_mounts(self, id: str) -> list[mount_pb2.Mount]:
        d = self.base / "ovl" / id
        (d / "upper").mkdir(parents=True, exist_ok=True)
        (d / "work").mkdir(exist_ok=True)
        opts = [f"lowerdir={self.rootfs}", f"upperdir={d / 'upper'}", f"workdir={d / 'work'}"]
        return [mount_pb2.Mount(type="overlay", source="overlay", options=opts)]

    def fifo_dir(self, id: str) -> Path:
        d = self.base / "fifo" / id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def reader(self, id: str, name: str) -> FifoReader:
        r = FifoReader(self.fifo_dir(id) / name)
        self.readers.append(r)
        return r

    def stdin_fifo(self, id: str) -> Path:
        p = self.fifo_dir(id) / "stdin"
        os.mkfifo(p, 0o700)
        return p

    async def start(self, id: str, bundle: Path) -> Client:
        addr = await launcher.start_shim(
            NS, id, str(bundle), self.grpc_address, self.ttrpc_address, b"", debug=True
        )
        client = await Client.connect(addr)
        self.clients.append(client)
        return client

    async def create(
        self,
        client: Client,
        id: str,
        bundle: Path,
        *,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
        terminal: bool = False,
    ) -> api.CreateTaskResponse:
        req = api.CreateTaskRequest(
            id=id,
            bundle=str(bundle),
            rootfs=self.rootfs_mounts(id),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            terminal=terminal,
        )
        return await call(client, "Create", req, api.CreateTaskResponse)


async def call(client: Client, method: str, req: Message, resp: type[M]) -> M:
    return await client.call(SERVICE, method, req, resp, timeout_s=30)


def mounted(path: Path) -> bool:
    return os.path.ismount(path)


def exists(path: str | Path) -> bool:
    return os.path.exists(path)


async def empty(client: Client, method: str, req: Message) -> None:
    await call(client, method, req, empty_pb2.Empty)


@pytest.fixture
async def shim_env(busybox_rootfs: Path, base_spec: dict[str, Any]) -> AsyncIterator[ShimEnv]:
    base = Path(tempfile.mkdtemp(prefix="shim-", dir="/tmp"))
    sink = EventSink()
    env = ShimEnv(base, busybox_rootfs, base_spec, sink)
    await sink.server.serve(env.ttrpc_address)
    try:
        yield env
    finally:
        for r in env.readers:
            r.close()
        for c in env.clients:
            await c.close()
        await sink.server.close()
        _teardown(env)


def _teardown(env: ShimEnv) -> None:
    """Kill what a failed test left: shims and containers, mounts, runc state."""
    root = Path(address.runc_root(env.grpc_address)) / NS
    if root.is_dir():
        for c in root.iterdir():
            subprocess.run(["runc", "--root", str(root), "delete", "--force", c.name], check=False)
    for b in (env.base / "b").glob("*") if (env.base / "b").is_dir() else []:
        subprocess.run(["umount", "-R", str(b / "rootfs")], check=False, capture_output=True)
    sdir = env.base / "s"
    if sdir.is_dir():
        for sock in sdir.iterdir():
            _kill_socket_owner(sock)
    shutil.rmtree(env.base, ignore_errors=True)


def _kill_socket_owner(sock: Path) -> None:
    """SIGKILL the processes listening on ``sock`` (found through /proc/net/unix inodes)."""
    inodes = set()
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == str(sock):
                inodes.add(parts[6])
    if not inodes:
        return
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    os.kill(int(pid), 9)
                    break
