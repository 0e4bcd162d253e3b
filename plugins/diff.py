"""Registrations of the differ (``io.containerd.differ.v1.walking``) and the Diff API."""

from __future__ import annotations

from pycontainerd.content.metadata import NamespacedContentStore
from pycontainerd.diff.service import Differ
from pycontainerd.grpc.diff import DiffServicer
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.plugins.staging import optional_stager


async def _differ(ic: InitContext) -> Differ:
    content = ic.get_by_id(PluginType.SERVICE, "content-service", NamespacedContentStore)
    ic.platforms.append("linux/amd64")
    return Differ(content, ic.state / "tmp", optional_stager(ic))


async def _grpc(ic: InitContext) -> DiffServicer:
    return DiffServicer(ic.get(PluginType.DIFFER, Differ))


differ = Registration(
    type=PluginType.DIFFER,
    id="walking",
    init=_differ,
    requires=(PluginType.SERVICE,),
)
service = Registration(type=PluginType.GRPC, id="diff", init=_grpc, requires=(PluginType.DIFFER,))
