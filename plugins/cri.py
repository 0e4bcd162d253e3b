"""Registration of the CRI plugin (``io.containerd.grpc.v1.cri``): Kubernetes' runtime and
image services on the daemon's own socket, over the daemon's stores in namespace k8s.io."""

from __future__ import annotations

from pycontainerd.cri.options import CRIConfig
from pycontainerd.cri.runtime import CRIRuntime
from pycontainerd.cri.servicer import CRIService
from pycontainerd.events.exchange import Exchange
from pycontainerd.network import NetworkManager
from pycontainerd.plugin import InitContext, PluginType, Registration

__all__ = ["cri"]


async def _init(ic: InitContext) -> CRIService:
    cfg: CRIConfig = ic.config
    network = NetworkManager(
        ic.state / "cni",
        cfg.cni_bin_dirs,
        cfg.cni_conf_dir or None,
        netns_dir=cfg.netns_dir or ic.state / "netns",
        bridge=cfg.cni_bridge,
        subnet=cfg.cni_subnet,
        default_network=cfg.cni_network,
    )
    rt = CRIRuntime(
        cfg,
        address=ic.address,
        root=ic.root,
        state=ic.state,
        exchange=ic.get(PluginType.EVENT, Exchange),
        network=network,
    )
    # Subscribes to task events now; recovery waits until the daemon serves its socket.
    rt.start()
    snapshotter_root = ic.root.parent / f"{PluginType.SNAPSHOTTER}.{cfg.snapshotter}"
    return CRIService(rt, snapshotter_root)


cri = Registration(
    type=PluginType.GRPC,
    id="cri",
    init=_init,
    requires=(PluginType.EVENT, PluginType.SERVICE),
    config=CRIConfig,
)
