"""Container networking for ``pcd run`` / ``rm``: namespaces, CNI, published ports.

``bridge`` (the default) and ``none`` give each container a network namespace of its own
at ``<exec_root>/netns/<container id>``, wired by ``pycontainerd.network.NetworkManager``
(state in ``<exec_root>/net``). The namespace path is fixed before the container record
is made (it goes into the spec) but the namespace is created only after the record
exists, so ``reclaim`` — which treats a namespace without a container as leaked — never
races a ``run`` in progress. ``host`` shares the host's namespace.

The portmap plugin installs DNAT rules without binding the host port, so a port taken by
another program (or another container) would silently lose to or steal its traffic:
``check_ports`` refuses such a ``-p`` before anything is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from pycontainerd.cli.state import (
    LABEL_NAME,
    LABEL_NET_DIR,
    LABEL_NETNS,
    LABEL_NETWORK,
    LABEL_PORTS,
    short_id,
)
from pycontainerd.errdefs import AlreadyExists, PycdError
from pycontainerd.network import HOST, NONE, PortMapping, Result

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pycontainerd.cli.state import Settings
    from pycontainerd.client import Client

__all__ = [
    "attach",
    "check_ports",
    "detach",
    "format_ports",
    "ports_from_label",
    "ports_label",
    "reclaim",
    "write_etc_files",
]

BRIDGE = "bridge"


def ports_label(maps: Sequence[PortMapping]) -> str:
    return json.dumps([[m.host_ip, m.host_port, m.container_port, m.protocol] for m in maps])


def ports_from_label(labels: Mapping[str, str]) -> list[PortMapping]:
    text = labels.get(LABEL_PORTS)
    if not text:
        return []
    try:
        return [PortMapping(str(a), int(b), int(c), str(d)) for a, b, c, d in json.loads(text)]
    except (ValueError, TypeError, PycdError):
        return []


def format_ports(maps: Sequence[PortMapping]) -> str:
    return ", ".join(
        f"{m.host_ip or '0.0.0.0'}:{m.host_port}->{m.container_port}/{m.protocol}" for m in maps
    )


def _overlaps(a: PortMapping, b: PortMapping) -> bool:
    if a.host_port != b.host_port or a.protocol != b.protocol:
        return False
    wild = ("", "0.0.0.0", "::")
    return a.host_ip in wild or b.host_ip in wild or a.host_ip == b.host_ip


def _probe_bind(m: PortMapping) -> None:
    """Bind the host port for a moment; AlreadyExists when some program holds it."""
    ip = m.host_ip or "0.0.0.0"
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    kind = socket.SOCK_DGRAM if m.protocol == "udp" else socket.SOCK_STREAM
    if m.protocol == "sctp":
        return  # rarely bindable without the sctp module; the label check still applies
    with socket.socket(family, kind) as s:
        # SO_REUSEADDR: a port whose old connections sit in TIME_WAIT is free to use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, m.host_port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AlreadyExists(
                    f"port {ip}:{m.host_port}/{m.protocol} is already in use on the host"
                ) from None
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            raise AlreadyExists(f"host IP {ip} is not an address of this host") from None


async def check_ports(client: Client, maps: Sequence[PortMapping]) -> None:
    """AlreadyExists when a wanted host port is published by another container (any
    namespace) or bound by a program on the host."""
    if not maps:
        return
    for ns in await client.list_namespaces():
        for c in await client.with_namespace(ns.name).list_containers():
            for theirs in ports_from_label(c.labels):
                for mine in maps:
                    if _overlaps(mine, theirs):
                        who = c.labels.get(LABEL_NAME) or short_id(c.id)
                        raise AlreadyExists(
                            f"port {theirs.host_ip or '0.0.0.0'}:{theirs.host_port}/"
                            f"{theirs.protocol} is already published by container {who}"
                        )
    for m in maps:
        await asyncio.to_thread(_probe_bind, m)


def netns_path(settings: Settings, network: str, container_id: str) -> str | None:
    """Where the container's namespace will be (None for ``host``)."""
    if network == HOST:
        return None
    return str(settings.netns_dir / container_id)


async def attach(
    settings: Settings, container_id: str, network: str, maps: Sequence[PortMapping]
) -> Result:
    """Create the namespace and run the plugins; everything is undone on failure."""
    if network == HOST:
        return Result()
    manager = settings.network_manager()
    path = await manager.create_netns(container_id)
    try:
        return await manager.setup(container_id, path, maps, network)
    except BaseException:
        with contextlib.suppress(PycdError):
            await manager.remove_netns(path)
        raise


async def detach(settings: Settings, container_id: str, labels: Mapping[str, str]) -> None:
    """Tear down what ``attach`` made, from the labels recorded on the container."""
    network = labels.get(LABEL_NETWORK, HOST)
    path = labels.get(LABEL_NETNS)
    if network == HOST or not path:
        return
    manager = settings.network_manager(labels.get(LABEL_NET_DIR), path)
    await manager.teardown(container_id, path)
    await manager.remove_netns(path)


async def reclaim(settings: Settings, client: Client) -> list[str]:
    """Release attachments and namespaces of containers that no longer exist."""
    manager = settings.network_manager()

    async def live() -> list[str]:
        ids: list[str] = []
        for ns in await client.list_namespaces():
            ids += [c.id for c in await client.with_namespace(ns.name).list_containers()]
        return ids

    report = await manager.reclaim(live)
    return [*report.attachments, *report.netns, *report.leases]


def write_etc_files(directory: Path, hostname: str, result: Result) -> tuple[Path, Path]:
    """``hosts`` and ``resolv.conf`` for a container with its own namespace (blocking)."""
    directory.mkdir(parents=True, exist_ok=True)
    hosts = directory / "hosts"
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if result.ip:
        lines.append(f"{result.ip}\t{hostname}")
    hosts.write_text("\n".join(lines) + "\n")
    resolv = directory / "resolv.conf"
    try:
        host_conf = Path("/etc/resolv.conf").read_text()
    except OSError:
        host_conf = ""
    kept = []
    for line in host_conf.splitlines():
        parts = line.split()
        # A loopback resolver (systemd-resolved's stub) is unreachable from the container.
        if parts[:1] == ["nameserver"] and len(parts) > 1 and _is_loopback(parts[1]):
            continue
        kept.append(line)
    if not any(ln.split()[:1] == ["nameserver"] for ln in kept):
        kept += ["nameserver 8.8.8.8", "nameserver 8.8.4.4"]
    resolv.write_text("\n".join(kept) + "\n")
    return hosts, resolv


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


NETWORKS = (BRIDGE, HOST, NONE)
