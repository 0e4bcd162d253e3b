"""The connection: one grpc.aio channel, the request metadata, and error translation.

Every call carries ``containerd-namespace`` (the client's namespace) and, while a lease
is active in the calling task (``async with client.lease():``), ``containerd-lease``.
The lease lives in a ContextVar, so tasks spawned inside the block (parallel blob
fetches) inherit it and unrelated tasks do not. Every gRPC failure leaves this package
as a ``pycontainerd.errdefs`` error (``rpc_errors``), never as a raw ``grpc.RpcError``.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Self

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from pycontainerd.api.services.containers.v1 import containers_pb2_grpc
from pycontainerd.api.services.content.v1 import content_pb2_grpc
from pycontainerd.api.services.diff.v1 import diff_pb2_grpc
from pycontainerd.api.services.events.v1 import events_pb2_grpc
from pycontainerd.api.services.images.v1 import images_pb2_grpc
from pycontainerd.api.services.leases.v1 import leases_pb2, leases_pb2_grpc
from pycontainerd.api.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from pycontainerd.api.services.pull.v1 import pull_pb2_grpc
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2_grpc
from pycontainerd.api.services.tasks.v1 import tasks_pb2_grpc
from pycontainerd.api.services.version.v1 import version_pb2_grpc
from pycontainerd.errdefs import PycdError, Unavailable, from_rpc_error

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping

    from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "DEFAULT_SNAPSHOTTER",
    "Lease",
    "Namespace",
    "RawClient",
    "rpc_errors",
    "timestamp_to_datetime",
]

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
DEFAULT_SNAPSHOTTER = "overlayfs"
# containerd's own clients raise the default 4 MiB limit to 16 MiB both ways.
MAX_MESSAGE = 16 << 20
GC_EXPIRE_LABEL = "containerd.io/gc.expire"

_current_lease: ContextVar[str | None] = ContextVar("pycontainerd_client_lease", default=None)


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Turn any ``grpc.RpcError`` raised inside into the matching domain error."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


def timestamp_to_datetime(ts: Timestamp) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    created_at: datetime
    labels: dict[str, str] = field(default_factory=dict)


class RawClient:
    """Channel, stubs and metadata; ``pycontainerd.client.Client`` adds the domain API."""

    def __init__(
        self,
        address: str,
        namespace: str = "default",
        *,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self._own_channel = channel is None
        if channel is None:
            target = address
            if not address.startswith(("unix:", "dns:", "ipv4:")):
                target = "unix:" + address
            channel = grpc.aio.insecure_channel(
                target,
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.max_send_message_length", MAX_MESSAGE),
                ],
            )
        self.channel = channel
        self.content_stub = content_pb2_grpc.ContentStub(channel)
        self.images_stub = images_pb2_grpc.ImagesStub(channel)
        self.leases_stub = leases_pb2_grpc.LeasesStub(channel)
        self.namespaces_stub = namespace_pb2_grpc.NamespacesStub(channel)
        self.snapshots_stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.diff_stub = diff_pb2_grpc.DiffStub(channel)
        self.containers_stub = containers_pb2_grpc.ContainersStub(channel)
        self.tasks_stub = tasks_pb2_grpc.TasksStub(channel)
        self.events_stub = events_pb2_grpc.EventsStub(channel)
        self.version_stub = version_pb2_grpc.VersionStub(channel)
        self.pull_stub = pull_pb2_grpc.PullStub(channel)  # pycontainerd's own

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    # ------------------------------------------------------------------ calls

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        lease = _current_lease.get()
        if lease:
            md.append((LEASE_HEADER, lease))
        return tuple(md)

    async def call(self, method: Any, request: Any) -> Any:
        """One unary RPC with our metadata; domain errors out."""
        with rpc_errors():
            return await method(request, metadata=self.metadata())

    async def stream(self, method: Any, request: Any) -> AsyncIterator[Any]:
        """One server-streaming RPC; cancelled when the consumer stops early."""
        call = method(request, metadata=self.metadata())
        try:
            with rpc_errors():
                async for msg in call:
                    yield msg
        finally:
            call.cancel()

    # ------------------------------------------------------------------ version

    async def version(self) -> tuple[str, str]:
        """(version, revision) of the daemon."""
        resp = await self.call(self.version_stub.Version, empty_pb2.Empty())
        return resp.version, resp.revision

    async def wait_ready(self, within: float = 10.0) -> None:
        """Wait for the daemon to answer; Unavailable after ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            try:
                await self.version()
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
            await self.channel.channel_ready()

    # ------------------------------------------------------------------ namespaces

    async def list_namespaces(self) -> list[Namespace]:
        resp = await self.call(self.namespaces_stub.List, namespace_pb2.ListNamespacesRequest())
        return [Namespace(n.name, dict(n.labels)) for n in resp.namespaces]

    async def get_namespace(self, name: str) -> Namespace:
        resp = await self.call(
            self.namespaces_stub.Get, namespace_pb2.GetNamespaceRequest(name=name)
        )
        return Namespace(resp.namespace.name, dict(resp.namespace.labels))

    async def create_namespace(
        self, name: str, labels: Mapping[str, str] | None = None
    ) -> Namespace:
        req = namespace_pb2.CreateNamespaceRequest(
            namespace=namespace_pb2.Namespace(name=name, labels=dict(labels or {}))
        )
        resp = await self.call(self.namespaces_stub.Create, req)
        return Namespace(resp.namespace.name, dict(resp.namespace.labels))

    async def update_namespace_labels(self, name: str, labels: Mapping[str, str]) -> Namespace:
        req = namespace_pb2.UpdateNamespaceRequest(
            namespace=namespace_pb2.Namespace(name=name, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        resp = await self.call(self.namespaces_stub.Update, req)
        return Namespace(resp.namespace.name, dict(resp.namespace.labels))

    async def delete_namespace(self, name: str) -> None:
        await self.call(
            self.namespaces_stub.Delete, namespace_pb2.DeleteNamespaceRequest(name=name)
        )

    async def default_snapshotter(self) -> str:
        """The namespace's ``containerd.io/defaults/snapshotter`` label, else overlayfs."""
        try:
            ns = await self.get_namespace(self.namespace)
        except PycdError:
            return DEFAULT_SNAPSHOTTER
        return ns.labels.get("containerd.io/defaults/snapshotter", DEFAULT_SNAPSHOTTER)

    # ------------------------------------------------------------------ leases

    async def create_lease(
        self,
        lease_id: str | None = None,
        *,
        expire: timedelta | None = timedelta(hours=24),
        labels: Mapping[str, str] | None = None,
    ) -> Lease:
        """Create a lease; by default it expires after 24 h, as ctr's leases do."""
        lease_id = lease_id or f"{time.time_ns()}-{secrets.token_hex(3)}"
        lbls = dict(labels or {})
        if expire is not None:
            at = datetime.now(UTC) + expire
            lbls[GC_EXPIRE_LABEL] = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        resp = await self.call(
            self.leases_stub.Create, leases_pb2.CreateRequest(id=lease_id, labels=lbls)
        )
        lease = resp.lease
        return Lease(lease.id, timestamp_to_datetime(lease.created_at), dict(lease.labels))

    async def delete_lease(self, lease_id: str, *, sync: bool = False) -> None:
        await self.call(self.leases_stub.Delete, leases_pb2.DeleteRequest(id=lease_id, sync=sync))

    async def list_leases(self, *filters: str) -> list[Lease]:
        resp = await self.call(self.leases_stub.List, leases_pb2.ListRequest(filters=filters))
        return [
            Lease(x.id, timestamp_to_datetime(x.created_at), dict(x.labels)) for x in resp.leases
        ]

    @contextlib.asynccontextmanager
    async def lease(
        self, *, expire: timedelta | None = timedelta(hours=24)
    ) -> AsyncIterator[Lease]:
        """Create a lease, make every call inside the block carry it, delete it on exit.

        Nested blocks reuse the outer lease, as containerd's ``WithLease`` does.
        """
        outer = _current_lease.get()
        if outer:
            yield Lease(outer, datetime.now(UTC))
            return
        created = await self.create_lease(expire=expire)
        token = _current_lease.set(created.id)
        try:
            yield created
        finally:
            _current_lease.reset(token)
            # The lease goes away even if the block failed; delete is idempotent enough
            # that a NotFound (someone else removed it) is not worth surfacing.
            with contextlib.suppress(PycdError):
                await self.delete_lease(created.id)

    @contextlib.contextmanager
    def using_lease(self, lease_id: str) -> Iterator[None]:
        """Make calls in this block carry an existing lease (not created or deleted here)."""
        token = _current_lease.set(lease_id)
        try:
            yield
        finally:
            _current_lease.reset(token)

    @staticmethod
    def current_lease() -> str | None:
        return _current_lease.get()
