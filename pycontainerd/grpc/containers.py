"""containerd.services.containers.v1.Containers over the containers domain service.

The spec, runtime options and extensions cross this boundary as opaque ``Any`` values:
their type URL and bytes go in and come back out untouched. An ``Any`` the client did not
set stays unset (a missing spec is what Create rejects), while a set-but-empty one is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2, empty_pb2

from pycontainerd.api.services.containers.v1 import containers_pb2 as pb
from pycontainerd.api.services.containers.v1 import containers_pb2_grpc
from pycontainerd.errdefs import InvalidArgument
from pycontainerd.grpc.convert import timestamp
from pycontainerd.services.containers import AnyValue, Container, Runtime

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import grpc.aio

    from pycontainerd.services.containers import ContainerService

    Ctx = grpc.aio.ServicerContext[Any, Any]


def _any_to_proto(v: AnyValue) -> any_pb2.Any:
    return any_pb2.Any(type_url=v.type_url, value=v.value)


def _opt_any_to_proto(v: AnyValue | None) -> any_pb2.Any | None:
    return None if v is None else _any_to_proto(v)


def _any_from_proto(msg: any_pb2.Any) -> AnyValue:
    return AnyValue(msg.type_url, msg.value)


def to_proto(c: Container) -> pb.Container:
    return pb.Container(
        id=c.id,
        labels=c.labels,
        image=c.image,
        runtime=pb.Container.Runtime(
            name=c.runtime.name, options=_opt_any_to_proto(c.runtime.options)
        ),
        spec=_opt_any_to_proto(c.spec),
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        created_at=timestamp(c.created_at),
        updated_at=timestamp(c.updated_at),
        extensions={k: _any_to_proto(v) for k, v in c.extensions.items()},
    )


def from_proto(msg: pb.Container) -> Container:
    rt = msg.runtime
    return Container(
        id=msg.id,
        labels=dict(msg.labels),
        image=msg.image,
        runtime=Runtime(rt.name, _any_from_proto(rt.options) if rt.HasField("options") else None),
        spec=_any_from_proto(msg.spec) if msg.HasField("spec") else None,
        snapshotter=msg.snapshotter,
        snapshot_key=msg.snapshot_key,
        extensions={k: _any_from_proto(v) for k, v in msg.extensions.items()},
    )


class ContainersServicer(containers_pb2_grpc.ContainersServicer):
    def __init__(self, service: ContainerService) -> None:
        self._svc = service

    def register(self, server: grpc.aio.Server) -> None:
        containers_pb2_grpc.add_ContainersServicer_to_server(self, server)

    async def Get(self, request: pb.GetContainerRequest, context: Ctx) -> pb.GetContainerResponse:
        return pb.GetContainerResponse(container=to_proto(await self._svc.get(request.id)))

    async def List(
        self, request: pb.ListContainersRequest, context: Ctx
    ) -> pb.ListContainersResponse:
        found = await self._svc.list_containers(list(request.filters))
        return pb.ListContainersResponse(containers=[to_proto(c) for c in found])

    async def ListStream(
        self, request: pb.ListContainersRequest, context: Ctx
    ) -> AsyncIterator[pb.ListContainerMessage]:
        # One message per container, so no single reply grows with the number of containers.
        for c in await self._svc.list_containers(list(request.filters)):
            yield pb.ListContainerMessage(container=to_proto(c))

    async def Create(
        self, request: pb.CreateContainerRequest, context: Ctx
    ) -> pb.CreateContainerResponse:
        created = await self._svc.create(from_proto(request.container))
        return pb.CreateContainerResponse(container=to_proto(created))

    async def Update(
        self, request: pb.UpdateContainerRequest, context: Ctx
    ) -> pb.UpdateContainerResponse:
        if not request.container.id:
            raise InvalidArgument("Container.ID required")
        updated = await self._svc.update(
            from_proto(request.container), list(request.update_mask.paths)
        )
        return pb.UpdateContainerResponse(container=to_proto(updated))

    async def Delete(self, request: pb.DeleteContainerRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.delete(request.id)
        return empty_pb2.Empty()
