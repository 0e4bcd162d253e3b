"""Registration of the layer stager (``io.containerd.internal.v1.staging``).

It unpacks layers on the side while their blobs arrive: for the daemon's own pull, and
speculatively for blobs written through the Content service that look like layers (so
that ``ctr images import``'s Diff.Apply finds them unpacked already). Staging
directories live under the plugin's root, which should be on the snapshotters'
filesystem: a layer staged elsewhere is unpacked again from its blob.

Config::

    [plugins."io.containerd.internal.v1.staging"]
    speculative_unpack = true   # unpack blobs written through Content.Write that look like layers
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.transfer.staging import Stager

__all__ = ["StagingConfig", "optional_stager", "staging"]


@dataclass(frozen=True, slots=True)
class StagingConfig:
    speculative_unpack: bool = True


async def _init(ic: InitContext) -> Stager:
    config = ic.config if isinstance(ic.config, StagingConfig) else StagingConfig()
    stager = Stager(ic.root, speculate=config.speculative_unpack)
    await asyncio.to_thread(stager.clean)
    return stager


def optional_stager(ic: InitContext) -> Stager | None:
    """The stager when it is loaded (it is listed before its users, so it inits first);
    None in a daemon built without it: layers are then unpacked the ordinary way."""
    plugin = ic.plugins.get(PluginType.INTERNAL, "staging")
    if plugin is None or not plugin.ok or not isinstance(plugin.instance, Stager):
        return None
    return plugin.instance


staging: Registration[Stager] = Registration(
    type=PluginType.INTERNAL, id="staging", init=_init, config=StagingConfig
)
