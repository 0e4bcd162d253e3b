"""The network manager: containers' namespaces wired by CNI, and reclaim after crashes.

Modes, as ``pcd run --network`` and the CRI use them:

* ``host`` — the container shares the host's namespace: no namespace, no plugins.
* ``none`` — a namespace of its own with only ``lo`` up (the ``loopback`` plugin).
* any configured network (default ``bridge``) — ``loopback`` for ``lo``, then the
  network's config list (by default ``bridge`` → ``host-local`` IPAM, then ``portmap``)
  for ``eth0``.

Attachments are recorded on disk before any plugin runs (see ``allocations``), so
``reclaim()`` can tear down what a crashed daemon left behind. Operations on one id are
serialised; different ids run concurrently (plugins lock their own shared state).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pycontainerd import identifiers
from pycontainerd.errdefs import AlreadyExists, InvalidArgument, NotFound, PycdError
from pycontainerd.network.allocations import (
    AttachmentRecord,
    RecordStore,
    release_orphan_leases,
)
from pycontainerd.network.cni import (
    DEFAULT_BIN_DIRS,
    CNIRunner,
    NetworkConfigList,
    RuntimeConf,
    load_conf_dir,
    parse_config,
)
from pycontainerd.network.iptables import purge_container_rules
from pycontainerd.network.netns import DEFAULT_NETNS_DIR, NetnsStore, is_netns
from pycontainerd.network.portmap import PortMapping, to_capability

__all__ = [
    "HOST",
    "NONE",
    "IPConfig",
    "Interface",
    "NetworkManager",
    "ReclaimReport",
    "Result",
    "default_bridge_conflist",
    "spec_network_namespace",
]

log = logging.getLogger(__name__)

HOST = "host"
NONE = "none"
DEFAULT_NETWORK = "bridge"
DEFAULT_CONF_NAME = "10-pycontainerd-bridge.conflist"
LOOPBACK_NETWORK = "cni-loopback"
CNI_VERSION = "1.0.0"

PortSpec = PortMapping | tuple[str, int, int, str] | tuple[str, int, int]
LiveIds = Callable[[], Awaitable[Iterable[str]]]


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True, slots=True)
class IPConfig:
    """An address given to the container: ``address`` with its prefix, and its gateway."""

    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: str | None = None
    interface: str | None = None

    @property
    def ip(self) -> str:
        return str(self.address.ip)


@dataclass(frozen=True, slots=True)
class Result:
    """What a setup gave the container; empty for ``host``, only ``lo`` for ``none``."""

    ips: tuple[IPConfig, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    gateway: str | None = None
    dns: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] | None = None

    @property
    def ip(self) -> str | None:
        """The primary address (first IPv4, else first of any family), as CRI reports it."""
        for c in self.ips:
            if c.address.version == 4:
                return c.ip
        return self.ips[0].ip if self.ips else None


@dataclass(slots=True)
class ReclaimReport:
    """What ``reclaim()`` released."""

    attachments: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def default_bridge_conflist(
    *,
    name: str = DEFAULT_NETWORK,
    bridge: str = "pcd0",
    subnet: str = "10.89.0.0/16",
    data_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """The bridge network written when none is configured (a ``.conflist`` document)."""
    net = ipaddress.ip_network(subnet)
    routes = [{"dst": "0.0.0.0/0" if net.version == 4 else "::/0"}]
    return {
        "cniVersion": CNI_VERSION,
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(net)}]],
                    "routes": routes,
                    "dataDir": os.fspath(data_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _loopback_conflist() -> NetworkConfigList:
    return NetworkConfigList(
        name=LOOPBACK_NETWORK, cni_version=CNI_VERSION, plugins=({"type": "loopback"},)
    )


def spec_network_namespace(network: str, netns_path: str | None) -> dict[str, str] | None:
    """The OCI ``linux.namespaces`` entry for a container on ``network``.

    None for ``host`` (leave the network namespace out of the spec, so runc keeps the
    host's); otherwise ``{"type": "network", "path": <netns>}``.
    """
    if network == HOST:
        return None
    if not netns_path:
        raise InvalidArgument(f"network {network!r} needs a network namespace path")
    return {"type": "network", "path": netns_path}


def _is_own_netns(path: str) -> bool:
    try:
        a = os.stat(path)
    except OSError:
        return False
    b = os.stat("/proc/self/ns/net")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _parse_result(doc: dict[str, Any] | None) -> Result:
    if not doc:
        return Result()
    interfaces = tuple(
        Interface(str(i.get("name", "")), str(i.get("mac", "")), str(i.get("sandbox", "")))
        for i in doc.get("interfaces") or []
        if isinstance(i, dict)
    )
    ips: list[IPConfig] = []
    gateway: str | None = None
    for entry in doc.get("ips") or []:
        if not isinstance(entry, dict) or "address" not in entry:
            continue
        idx = entry.get("interface")
        ifname = (
            interfaces[idx].name if isinstance(idx, int) and 0 <= idx < len(interfaces) else None
        )
        gw = entry.get("gateway")
        cfg = IPConfig(ipaddress.ip_interface(entry["address"]), gw, ifname)
        ips.append(cfg)
        if gateway is None and gw:
            gateway = str(gw)
    dns = doc.get("dns") if isinstance(doc.get("dns"), dict) else {}
    return Result(tuple(ips), interfaces, gateway, dict(dns or {}), doc)


class NetworkManager:
    """Creates network namespaces and attaches containers to CNI networks.

    ``state_dir`` holds our records, the default config (when ``conf_dir`` is None) and
    host-local's leases; ``netns_dir`` the namespace files.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        cni_bin_dirs: Iterable[str] = DEFAULT_BIN_DIRS,
        conf_dir: str | os.PathLike[str] | None = None,
        *,
        netns_dir: str | os.PathLike[str] = DEFAULT_NETNS_DIR,
        bridge: str = "pcd0",
        subnet: str = "10.89.0.0/16",
        default_network: str = DEFAULT_NETWORK,
        ifname: str = "eth0",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.conf_dir = Path(conf_dir) if conf_dir is not None else self.state_dir / "net.d"
        self.ipam_dir = self.state_dir / "ipam"
        self.netns = NetnsStore(netns_dir)
        self.runner = CNIRunner(tuple(cni_bin_dirs))
        self.records = RecordStore(self.state_dir / "attachments")
        self.default_network = default_network
        self.ifname = ifname
        self._bridge = bridge
        self._subnet = str(ipaddress.ip_network(subnet))
        self._networks: dict[str, NetworkConfigList] | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    # --- configuration -------------------------------------------------------------

    async def load(self) -> dict[str, NetworkConfigList]:
        """(Re)read ``conf_dir``, writing the default bridge list if its name is missing."""
        self._networks = await asyncio.to_thread(self._load_sync)
        return dict(self._networks)

    def _load_sync(self) -> dict[str, NetworkConfigList]:
        nets = load_conf_dir(self.conf_dir)
        if self.default_network not in nets:
            doc = default_bridge_conflist(
                name=self.default_network,
                bridge=self._bridge,
                subnet=self._subnet,
                data_dir=self.ipam_dir,
            )
            self.conf_dir.mkdir(parents=True, exist_ok=True)
            path = self.conf_dir / DEFAULT_CONF_NAME
            # A unique temporary name: concurrent first setups may all write the default.
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.conf_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp, path)
            log.info("wrote default CNI network %r to %s", self.default_network, path)
            nets[self.default_network] = parse_config(json.dumps(doc), source=str(path))
        return nets

    async def networks(self) -> dict[str, NetworkConfigList]:
        if self._networks is None:
            await self.load()
        assert self._networks is not None
        return dict(self._networks)

    async def status(self) -> None:
        """Raise NotFound when a plugin the networks need is not installed (CRI's
        NetworkReady condition)."""
        needed = {"loopback"}
        for conf in (await self.networks()).values():
            needed.update(p["type"] for p in conf.plugins)
            for p in conf.plugins:
                ipam = p.get("ipam")
                if isinstance(ipam, dict) and isinstance(ipam.get("type"), str):
                    needed.add(ipam["type"])
        for t in sorted(needed):
            await asyncio.to_thread(self.runner.find, t)

    # --- namespaces ----------------------------------------------------------------

    async def create_netns(self, name: str) -> str:
        """A new network namespace named ``name`` (use the container id); its path."""
        return str(await self.netns.create(name))

    async def remove_netns(self, path: str | os.PathLike[str]) -> None:
        """Unmount and delete a namespace made by ``create_netns``; quiet if gone."""
        await self.netns.remove(path)

    # --- attach / detach -----------------------------------------------------------

    def _lock(self, id: str) -> asyncio.Lock:
        lock = self._locks.get(id)
        if lock is None:
            lock = self._locks[id] = asyncio.Lock()
        return lock

    async def setup(
        self,
        id: str,
        netns_path: str | None,
        port_mappings: Iterable[PortSpec] = (),
        network: str = DEFAULT_NETWORK,
        *,
        args: Iterable[tuple[str, str]] = (),
    ) -> Result:
        """Attach container ``id`` (its namespace at ``netns_path``) to ``network``.

        ``host``: nothing to do (empty Result). ``none``: ``lo`` up. Otherwise ``lo`` and
        ``eth0`` on the network with ``port_mappings`` published. AlreadyExists when
        ``id`` is attached; InvalidArgument for a bad mapping or unknown network;
        PluginError when a plugin fails (everything done so far is undone first).
        """
        identifiers.validate(id)
        if network == HOST:
            return Result()
        maps = [PortMapping.of(m) for m in port_mappings]
        if maps and network == NONE:
            raise InvalidArgument("ports cannot be published on network 'none'")
        if not netns_path:
            raise InvalidArgument(f"network {network!r} needs a network namespace")
        if await asyncio.to_thread(_is_own_netns, netns_path):
            # Wiring the daemon's own namespace would reconfigure the host (and DEL of the
            # loopback plugin would take its lo down): that is what "host" is for.
            raise InvalidArgument(f"{netns_path} is the host's network namespace; use 'host'")
        conf: NetworkConfigList | None = None
        if network != NONE:
            conf = (await self.networks()).get(network)
            if conf is None:
                raise NotFound(f"CNI network {network!r}")
        caps: dict[str, Any] = {"portMappings": to_capability(maps)} if maps else {}
        async with self._lock(id):
            if await asyncio.to_thread(self.records.get, id) is not None:
                raise AlreadyExists(f"network attachment for {id!r}")
            rec = AttachmentRecord(
                id=id,
                network=network,
                netns=netns_path,
                ifname=self.ifname,
                conflist=conf.to_json() if conf is not None else None,
                loopback=_loopback_conflist().to_json(),
                capability_args=caps,
            )
            # Intent first: a crash after this line leaves a record reclaim can undo.
            await asyncio.to_thread(self.records.put, rec)
            rt_args = tuple(args)
            try:
                # lo and the network's interface are independent: their plugins run at
                # the same time (go-cni's Setup does the same for containerd's CRI).
                adds = [
                    self.runner.add_list(
                        _loopback_conflist(), RuntimeConf(id, netns_path, "lo", rt_args)
                    )
                ]
                if conf is not None:
                    adds.append(
                        self.runner.add_list(
                            conf, RuntimeConf(id, netns_path, self.ifname, rt_args, caps)
                        )
                    )
                done = await asyncio.gather(*adds, return_exceptions=True)
                for outcome in done:
                    if isinstance(outcome, BaseException):
                        raise outcome
                raw: dict[str, Any] | None = None
                if conf is not None:
                    raw = cast("dict[str, Any]", done[1])
                rec.result = raw
                await asyncio.to_thread(self.records.put, rec)
            except BaseException:
                # Undo a half-made attachment now rather than leaving it to reclaim.
                try:
                    await self._teardown_record(rec)
                except Exception as exc:
                    log.warning("rollback of network setup for %s failed: %s", id, exc)
                raise
        return _parse_result(raw)

    async def teardown(self, id: str, netns_path: str | None = None) -> None:
        """Detach ``id``: DEL its plugins (releasing IP and port rules); quiet if unknown.

        Does not remove the namespace (see ``remove_netns``), so callers keep ordering:
        teardown first, then remove the namespace.
        """
        async with self._lock(id):
            rec = await asyncio.to_thread(self.records.get, id)
            if rec is None:
                return
            if netns_path and not rec.netns:
                rec.netns = netns_path
            await self._teardown_record(rec)
        self._locks.pop(id, None)

    async def _teardown_record(self, rec: AttachmentRecord) -> None:
        # A namespace that is gone (reboot, removed by hand) is passed as "" so plugins do
        # their best-effort cleanup rather than fail to enter it.
        present: bool = bool(rec.netns) and await asyncio.to_thread(is_netns, rec.netns)
        netns = rec.netns if present else ""
        if rec.conflist is not None:
            conf = parse_config(json.dumps(rec.conflist), source=f"record {rec.id}")
            await self.runner.del_list(
                conf,
                RuntimeConf(rec.id, netns, rec.ifname, (), rec.capability_args),
                rec.result,
            )
            if not present and any(p.get("ipMasq") for p in conf.plugins):
                # Without the namespace the bridge plugin cannot find its masquerade rules.
                await purge_container_rules(conf.name, rec.id)
        if rec.loopback is not None and netns:
            lo = parse_config(json.dumps(rec.loopback), source=f"record {rec.id}")
            try:
                await self.runner.del_list(lo, RuntimeConf(rec.id, netns, "lo"), None)
            except PycdError as exc:
                # lo dies with its namespace; never keep an attachment alive for it.
                log.info("loopback DEL for %s: %s", rec.id, exc)
        await asyncio.to_thread(self.records.delete, rec.id)

    async def check(self, id: str) -> None:
        """CNI CHECK of ``id``'s attachment; NotFound when not attached."""
        rec = await asyncio.to_thread(self.records.get, id)
        if rec is None:
            raise NotFound(f"network attachment for {id!r}")
        if rec.conflist is None or rec.result is None:
            return
        conf = parse_config(json.dumps(rec.conflist), source=f"record {rec.id}")
        await self.runner.check_list(
            conf, RuntimeConf(id, rec.netns, rec.ifname, (), rec.capability_args), rec.result
        )

    async def attachment(self, id: str) -> Result | None:
        """The recorded result of ``id``'s setup (e.g. for a status after restart)."""
        rec = await asyncio.to_thread(self.records.get, id)
        return None if rec is None else _parse_result(rec.result)

    # --- reclaim -------------------------------------------------------------------

    async def reclaim(self, live_ids: LiveIds) -> ReclaimReport:
        """Release what belongs to no live container: attachments, namespaces, leases.

        Meant for start-up, before new containers are made. What exists on disk is listed
        *before* ``live_ids`` is asked, so anything created meanwhile is never touched.
        """
        report = ReclaimReport()
        records = await asyncio.to_thread(self.records.list)
        namespaces = await self.netns.list()
        live = set(await live_ids())
        for rec in records:
            if rec.id in live:
                continue
            try:
                await self._teardown_record(rec)
                report.attachments.append(rec.id)
            except PycdError as exc:
                report.errors.append(f"{rec.id}: {exc}")
                log.warning("reclaim of network attachment %s failed: %s", rec.id, exc)
        for name, path in namespaces.items():
            if name in live:
                continue
            await self.netns.remove(path)
            report.netns.append(name)
        # Leases nobody recorded (a crash inside host-local's ADD, or records lost).
        keep = live | {r.id for r in await asyncio.to_thread(self.records.list)}
        for net in await asyncio.to_thread(self._lease_networks):
            freed = await asyncio.to_thread(release_orphan_leases, self.ipam_dir, net, keep)
            report.leases.extend(f"{net}/{lease.ip}" for lease in freed)
        return report

    def _lease_networks(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.ipam_dir) if (self.ipam_dir / n).is_dir())
        except FileNotFoundError:
            return []

    async def live_records(self) -> Collection[str]:
        """Ids with an attachment record."""
        return [r.id for r in await asyncio.to_thread(self.records.list)]
