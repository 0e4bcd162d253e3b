"""Registrations of the daemon's core plugins: metadata, namespaces, leases, version,
introspection and health."""

from __future__ import annotations

import asyncio

from pycontainerd.events import Publisher
from pycontainerd.grpc.health import HealthServicer
from pycontainerd.grpc.introspection import IntrospectionServicer, load_uuid
from pycontainerd.grpc.leases import LeasesServicer
from pycontainerd.grpc.namespaces import NamespacesServicer
from pycontainerd.grpc.version import VersionServicer
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.services.leases import LeaseService
from pycontainerd.services.namespaces import NamespaceService


async def _metadata(ic: InitContext) -> MetadataDB:
    db = MetadataDB(ic.root / "meta.db")
    await db.open()
    ic.exports["path"] = str(db.path)
    return db


async def _namespaces_service(ic: InitContext) -> NamespaceService:
    return NamespaceService(
        ic.get(PluginType.METADATA, MetadataDB),
        ic.get(PluginType.EVENT, Publisher),  # type: ignore[type-abstract]
    )


async def _leases_service(ic: InitContext) -> LeaseService:
    svc = LeaseService(ic.get(PluginType.METADATA, MetadataDB))
    svc.start()
    return svc


async def _namespaces_grpc(ic: InitContext) -> NamespacesServicer:
    return NamespacesServicer(
        ic.get_by_id(PluginType.SERVICE, "namespaces-service", NamespaceService)
    )


async def _leases_grpc(ic: InitContext) -> LeasesServicer:
    return LeasesServicer(ic.get_by_id(PluginType.SERVICE, "leases-service", LeaseService))


async def _version(ic: InitContext) -> VersionServicer:
    return VersionServicer()


async def _introspection(ic: InitContext) -> IntrospectionServicer:
    value = await asyncio.to_thread(load_uuid, ic.root)
    return IntrospectionServicer(ic.plugins, value)


async def _health(ic: InitContext) -> HealthServicer:
    return HealthServicer()


metadata = Registration(type=PluginType.METADATA, id="bolt", init=_metadata)
namespaces_service = Registration(
    type=PluginType.SERVICE,
    id="namespaces-service",
    init=_namespaces_service,
    requires=(PluginType.METADATA, PluginType.EVENT),
)
leases_service = Registration(
    type=PluginType.SERVICE,
    id="leases-service",
    init=_leases_service,
    requires=(PluginType.METADATA,),
)
namespaces = Registration(
    type=PluginType.GRPC, id="namespaces", init=_namespaces_grpc, requires=(PluginType.SERVICE,)
)
leases = Registration(
    type=PluginType.GRPC, id="leases", init=_leases_grpc, requires=(PluginType.SERVICE,)
)
version = Registration(type=PluginType.GRPC, id="version", init=_version)
introspection = Registration(
    type=PluginType.GRPC, id="introspection", init=_introspection, requires=("*",)
)
health = Registration(type=PluginType.GRPC, id="healthcheck", init=_health)
