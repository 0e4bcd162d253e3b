"""containerd.services.namespaces.v1.Namespaces over the namespaces domain service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc.aio
from google.protobuf import empty_pb2

from pycontainerd.api.services.namespaces.v1 import namespace_pb2 as pb
from pycontainerd.api.services.namespaces.v1 import namespace_pb2_grpc

if TYPE_CHECKING:
    from pycontainerd.services.namespaces import Namespace, NamespaceService

Ctx = grpc.aio.ServicerContext[Any, Any]


def _msg(ns: Namespace) -> pb.Namespace:
    return pb.Namespace(name=ns.name, labels=ns.labels)


class NamespacesServicer(namespace_pb2_grpc.NamespacesServicer):
    def __init__(self, service: NamespaceService) -> None:
        self._svc = service

    def register(self, server: grpc.aio.Server) -> None:
        namespace_pb2_grpc.add_NamespacesServicer_to_server(self, server)

    async def Get(self, request: pb.GetNamespaceRequest, context: Ctx) -> pb.GetNamespaceResponse:
        return pb.GetNamespaceResponse(namespace=_msg(await self._svc.get(request.name)))

    async def List(
        self, request: pb.ListNamespacesRequest, context: Ctx
    ) -> pb.ListNamespacesResponse:
        return pb.ListNamespacesResponse(
            namespaces=[_msg(n) for n in await self._svc.list_namespaces()]
        )

    async def Create(
        self, request: pb.CreateNamespaceRequest, context: Ctx
    ) -> pb.CreateNamespaceResponse:
        ns = await self._svc.create(request.namespace.name, dict(request.namespace.labels))
        return pb.CreateNamespaceResponse(namespace=_msg(ns))

    async def Update(
        self, request: pb.UpdateNamespaceRequest, context: Ctx
    ) -> pb.UpdateNamespaceResponse:
        ns = await self._svc.update(
            request.namespace.name, dict(request.namespace.labels), list(request.update_mask.paths)
        )
        return pb.UpdateNamespaceResponse(namespace=_msg(ns))

    async def Delete(self, request: pb.DeleteNamespaceRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.delete(request.name)
        return empty_pb2.Empty()
