"""What every ``pcd`` command shares: global settings, labels, and name resolution.

pcd keeps no database of its own. Everything a later invocation needs about a container
lives in the container record's labels (``pcd.*``): its name, network mode, published
ports, the network namespace and the network manager's state directory, the log
directory, and — once its task is gone — its exit code and finish time. So ``ps``,
``rm`` and ``logs`` work from any later invocation, and ``ctr`` sees the same facts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pycontainerd.cli.commands import DEFAULT_ADDRESS
from pycontainerd.client._client import timestamp_to_datetime
from pycontainerd.client._sdk import Client
from pycontainerd.client.reference import normalize
from pycontainerd.errdefs import InvalidArgument, NotFound, PycdError

# Container, task and network modules are imported where used: ``pcd pull`` and the
# image commands never need them, and every command pays for what this module imports.

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pycontainerd.client import Container, Image, Task  # noqa: TC004 (annotations only)
    from pycontainerd.network import NetworkManager

__all__ = [
    "LABEL_EXIT_CODE",
    "LABEL_FINISHED",
    "LABEL_LOG_DIR",
    "LABEL_NAME",
    "LABEL_NETNS",
    "LABEL_NETWORK",
    "LABEL_NET_DIR",
    "LABEL_PORTS",
    "ContainerRow",
    "Settings",
    "describe",
    "find_container",
    "find_image",
    "list_rows",
    "short_id",
    "task_of",
    "update_labels",
]

DEFAULT_DATA_ROOT = "/var/lib/pcd"
DEFAULT_EXEC_ROOT = "/run/pcd"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")

LABEL_NAME = "pcd.name"
LABEL_NETWORK = "pcd.network"
LABEL_PORTS = "pcd.ports"
LABEL_NETNS = "pcd.netns"
LABEL_NET_DIR = "pcd.net-dir"
LABEL_LOG_DIR = "pcd.log-dir"
LABEL_EXIT_CODE = "pcd.exit-code"
LABEL_FINISHED = "pcd.finished-at"


@dataclass(frozen=True, slots=True)
class Settings:
    """Global options: daemon address, namespace, and where pcd keeps its own files."""

    address: str
    namespace: str
    data_root: Path  # logs: <data_root>/containers/<namespace>/<id>/
    exec_root: Path  # network state (<exec_root>/net) and namespaces (<exec_root>/netns)

    @classmethod
    def from_env(
        cls,
        address: str | None = None,
        namespace: str | None = None,
        data_root: str | None = None,
        exec_root: str | None = None,
    ) -> Settings:
        env = os.environ
        return cls(
            address or env.get("PCD_ADDRESS") or DEFAULT_ADDRESS,
            namespace or env.get("PCD_NAMESPACE") or "default",
            Path(data_root or env.get("PCD_DATA_ROOT") or DEFAULT_DATA_ROOT),
            Path(exec_root or env.get("PCD_EXEC_ROOT") or DEFAULT_EXEC_ROOT),
        )

    def client(self) -> Client:
        return Client(self.address, self.namespace)

    @property
    def net_dir(self) -> Path:
        return self.exec_root / "net"

    @property
    def netns_dir(self) -> Path:
        return self.exec_root / "netns"

    def log_dir(self, container_id: str) -> Path:
        return self.data_root / "containers" / self.namespace / container_id

    def network_manager(
        self, net_dir: str | None = None, netns_path: str | None = None
    ) -> NetworkManager:
        """The manager for new containers, or the one recorded in an old one's labels."""
        from pycontainerd.network import NetworkManager

        netns_dir = Path(netns_path).parent if netns_path else self.netns_dir
        return NetworkManager(
            Path(net_dir) if net_dir else self.net_dir, CNI_BIN_DIRS, netns_dir=netns_dir
        )


def describe(exc: BaseException) -> str:
    """One line for people: the error's own message, without the class suffix."""
    raw = exc.message if isinstance(exc, PycdError) and exc.message else str(exc)
    return " ".join(raw.split()) or type(exc).__name__


def short_id(container_id: str) -> str:
    return container_id[:12]


@dataclass(frozen=True, slots=True)
class ContainerRow:
    """A container with its creation time and (when it has one) its task's state."""

    container: Container
    created_at: datetime
    status: str  # created, running, stopped, paused, ... or "" when there is no task
    pid: int = 0
    exit_code: int | None = None
    exited_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.container.labels.get(LABEL_NAME, "")

    @property
    def running(self) -> bool:
        return self.status in ("running", "paused", "pausing", "created")


async def list_rows(client: Client) -> list[ContainerRow]:
    """Every container of the namespace with its task state, oldest first."""
    from pycontainerd.api.services.containers.v1 import containers_pb2
    from pycontainerd.api.services.tasks.v1 import tasks_pb2
    from pycontainerd.api.types.task import task_pb2
    from pycontainerd.client.containers import Container

    resp = await client.call(client.containers_stub.List, containers_pb2.ListContainersRequest())
    tasks = await client.call(client.tasks_stub.List, tasks_pb2.ListTasksRequest())
    by_id = {t.id: t for t in tasks.tasks}
    names = {
        task_pb2.CREATED: "created",
        task_pb2.RUNNING: "running",
        task_pb2.STOPPED: "stopped",
        task_pb2.PAUSED: "paused",
        task_pb2.PAUSING: "pausing",
    }
    rows = []
    for pb in resp.containers:
        c = Container.from_pb(client, pb)
        t = by_id.get(pb.id)
        if t is None:
            rows.append(ContainerRow(c, timestamp_to_datetime(pb.created_at), ""))
            continue
        status = names.get(t.status, "unknown")
        stopped = status == "stopped"
        rows.append(
            ContainerRow(
                c,
                timestamp_to_datetime(pb.created_at),
                status,
                t.pid,
                t.exit_status if stopped else None,
                timestamp_to_datetime(t.exited_at) if stopped else None,
            )
        )
    rows.sort(key=lambda r: r.created_at)
    return rows


async def find_container(client: Client, ref: str) -> ContainerRow:
    """A container by full id, name, or unique id prefix; NotFound / InvalidArgument."""
    rows = await list_rows(client)
    for r in rows:
        if r.container.id == ref:
            return r
    for r in rows:
        if r.name == ref:
            return r
    matches = [r for r in rows if ref and r.container.id.startswith(ref)]
    if len(matches) > 1:
        raise InvalidArgument(f"container id prefix {ref!r} is ambiguous")
    if not matches:
        raise NotFound(f"no such container: {ref}")
    return matches[0]


async def find_image(client: Client, name: str) -> Image:
    """An image by its exact name, else by its normalized reference (``busybox`` →
    ``docker.io/library/busybox:latest``); NotFound, or InvalidArgument for bad syntax."""
    with contextlib.suppress(NotFound):
        return await client.get_image(name)
    try:
        canonical = normalize(name)
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid reference format: {exc.message}") from None
    if canonical != name:
        with contextlib.suppress(NotFound):
            return await client.get_image(canonical)
    raise NotFound(f"no such image: {name}")


async def update_labels(client: Client, container: Container, labels: Mapping[str, str]) -> None:
    """Set some labels of a container record (others are left alone)."""
    from google.protobuf import field_mask_pb2

    from pycontainerd.api.services.containers.v1 import containers_pb2

    record = containers_pb2.Container(id=container.id, labels=dict(labels))
    req = containers_pb2.UpdateContainerRequest(
        container=record,
        update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
    )
    await client.call(client.containers_stub.Update, req)


async def task_of(container: Container) -> Task | None:
    try:
        return await container.task()
    except NotFound:
        return None
