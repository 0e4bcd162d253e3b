"""Registration of pycontainerd's Pull service (``io.containerd.grpc.v1.pull``).

Config: none. Layers are staged by ``io.containerd.internal.v1.staging``.
"""

from __future__ import annotations

from pycontainerd.content.metadata import NamespacedContentStore
from pycontainerd.grpc.pull import PullServicer
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.transfer.pull import DaemonPull
from pycontainerd.transfer.staging import Stager

__all__ = ["pull"]


async def _init(ic: InitContext) -> PullServicer:
    content = ic.get_by_id(PluginType.SERVICE, "content-service", NamespacedContentStore)
    stager = ic.get_by_id(PluginType.INTERNAL, "staging", Stager)
    return PullServicer(DaemonPull(content, stager, ic.address))


pull: Registration[PullServicer] = Registration(
    type=PluginType.GRPC, id="pull", init=_init, requires=(PluginType.SERVICE, PluginType.INTERNAL)
)
