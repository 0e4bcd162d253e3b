"""containerd.services.leases.v1.Leases over the leases domain service."""

from __future__ import annotations

from typing import Any

import grpc.aio
from google.protobuf import empty_pb2

from pycontainerd import filters
from pycontainerd.api.services.leases.v1 import leases_pb2 as pb
from pycontainerd.api.services.leases.v1 import leases_pb2_grpc
from pycontainerd.grpc.convert import timestamp
from pycontainerd.services.leases import Lease, LeaseService, Resource

Ctx = grpc.aio.ServicerContext[Any, Any]


def _msg(lease: Lease) -> pb.Lease:
    return pb.Lease(id=lease.id, created_at=timestamp(lease.created_at), labels=lease.labels)


def _adaptor(lease: Lease) -> filters.Adaptor:
    def get(path: Any) -> tuple[str, bool]:
        if not path:
            return "", False
        if path[0] == "id":
            return lease.id, True
        if path[0] == "labels" and len(path) > 1:
            key = ".".join(path[1:])
            return lease.labels.get(key, ""), key in lease.labels
        return "", False

    return get


class LeasesServicer(leases_pb2_grpc.LeasesServicer):
    def __init__(self, service: LeaseService) -> None:
        self._svc = service

    def register(self, server: grpc.aio.Server) -> None:
        leases_pb2_grpc.add_LeasesServicer_to_server(self, server)

    async def Create(self, request: pb.CreateRequest, context: Ctx) -> pb.CreateResponse:
        lease = await self._svc.create(request.id, dict(request.labels))
        return pb.CreateResponse(lease=_msg(lease))

    async def Delete(self, request: pb.DeleteRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.delete(request.id, request.sync)
        return empty_pb2.Empty()

    async def List(self, request: pb.ListRequest, context: Ctx) -> pb.ListResponse:
        flt = filters.parse(list(request.filters))
        leases = await self._svc.list_leases()
        return pb.ListResponse(leases=[_msg(x) for x in leases if flt.match(_adaptor(x))])

    async def AddResource(self, request: pb.AddResourceRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.add_resource(
            request.id, Resource(request.resource.id, request.resource.type)
        )
        return empty_pb2.Empty()

    async def DeleteResource(
        self, request: pb.DeleteResourceRequest, context: Ctx
    ) -> empty_pb2.Empty:
        await self._svc.delete_resource(
            request.id, Resource(request.resource.id, request.resource.type)
        )
        return empty_pb2.Empty()

    async def ListResources(
        self, request: pb.ListResourcesRequest, context: Ctx
    ) -> pb.ListResourcesResponse:
        resources = await self._svc.list_resources(request.id)
        return pb.ListResourcesResponse(
            resources=[pb.Resource(id=r.id, type=r.type) for r in resources]
        )
