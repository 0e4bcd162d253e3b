"""Registration of pycontainerd's Pull service (``io.containerd.grpc.v1.pull``).

Config: none. Staging directories live under the plugin's root
(``<root>/io.containerd.grpc.v1.pull/staging``), which should be on the snapshotters'
filesystem: a layer staged elsewhere is unpacked again from its blob.
"""

from __future__ import annotations

import asyncio

from pycontainerd.content.metadata import NamespacedContentStore
from pycontainerd.grpc.pull import PullServicer
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.transfer.pull import DaemonPull
from pycontainerd.transfer.staging import Stager

__all__ = ["pull"]


async def _init(ic: InitContext) -> PullServicer:
    content = ic.get_by_id(PluginType.SERVICE, "content-service", NamespacedContentStore)
    stager = Stager(ic.root / "staging")
    await asyncio.to_thread(stager.clean)
    return PullServicer(DaemonPull(content, stager, ic.address))


pull: Registration[PullServicer] = Registration(
    type=PluginType.GRPC, id="pull", init=_init, requires=(PluginType.SERVICE,)
)
