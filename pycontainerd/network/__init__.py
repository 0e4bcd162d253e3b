"""Container networking: network namespaces and CNI plugins, for the CLI and the CRI.

``NetworkManager`` is the entry point: ``create_netns`` → ``setup`` (returns the IPs) →
… → ``teardown`` → ``remove_netns``, and ``reclaim`` at start-up to release what a
crashed daemon left behind. ``netns`` holds the namespace helpers (unshare and bind
mounts, in-process), ``cni`` runs plugins per the CNI spec, ``portmap`` converts
published ports, ``allocations`` is the on-disk state. Needs the
``containernetworking-plugins`` package (``/usr/lib/cni``).
"""

from __future__ import annotations

from pycontainerd.network.cni import CNIRunner, NetworkConfigList, PluginError, RuntimeConf
from pycontainerd.network.manager import (
    HOST,
    NONE,
    Interface,
    IPConfig,
    NetworkManager,
    ReclaimReport,
    Result,
    default_bridge_conflist,
    spec_network_namespace,
)
from pycontainerd.network.netns import NetnsStore, run_in_netns, unmount_netns_dir
from pycontainerd.network.portmap import PortMapping, parse_publish

__all__ = [
    "HOST",
    "NONE",
    "CNIRunner",
    "IPConfig",
    "Interface",
    "NetnsStore",
    "NetworkConfigList",
    "NetworkManager",
    "PluginError",
    "PortMapping",
    "ReclaimReport",
    "Result",
    "RuntimeConf",
    "default_bridge_conflist",
    "parse_publish",
    "run_in_netns",
    "spec_network_namespace",
    "unmount_netns_dir",
]
