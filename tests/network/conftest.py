"""Fixtures for the CNI tests: a bridge and subnet of this test session's own.

Everything the real plugins touch on the host is named after the session (bridge
``pcdt<pid>``, a /24 chosen from the pid that overlaps no host route) and put back at the
end: the bridge is deleted, ``net.ipv4.ip_forward`` restored, and the shared portmap
chains removed when this session created them and nothing else uses them.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pyroute2 import IPRoute

from pycontainerd.network import NetworkManager, unmount_netns_dir

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
NEEDED_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
SHARED_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")


@dataclass(frozen=True)
class NetEnv:
    bridge: str
    subnet: ipaddress.IPv4Network


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, iptables)"
    for plugin in NEEDED_PLUGINS:
        if not any(os.access(Path(d) / plugin, os.X_OK) for d in CNI_DIRS):
            return f"CNI plugin {plugin!r} missing (apt install containernetworking-plugins)"
    for tool in ("iptables", "iptables-save", "nsenter", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt install iptables iputils-ping util-linux)"
    try:
        subprocess.run(["iptables", "-t", "nat", "-S"], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        return f"iptables nat table unusable: {exc.stderr.decode(errors='replace').strip()}"
    return None


def _host_networks() -> list[ipaddress.IPv4Network]:
    nets: list[ipaddress.IPv4Network] = []
    with IPRoute() as ipr:
        for r in ipr.get_routes(family=2):
            dst = r.get_attr("RTA_DST")
            if dst:
                nets.append(ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False))
        for a in ipr.get_addr(family=2):
            nets.append(
                ipaddress.IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
            )
    return nets


def _pick_subnet(pid: int) -> ipaddress.IPv4Network:
    taken = _host_networks()
    for i in range(64):
        n = (pid + i * 7919) % (56 * 256)
        candidate = ipaddress.IPv4Network(f"10.{200 + n // 256}.{n % 256}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise RuntimeError("no free 10.200-255.x.0/24 subnet for the test bridge")


def _nat_rules() -> list[str]:
    out = subprocess.run(["iptables", "-t", "nat", "-S"], check=True, capture_output=True)
    return out.stdout.decode().splitlines()


def _remove_shared_chains_if_unused() -> None:
    rules = _nat_rules()
    if any(r.startswith("-A CNI-HOSTPORT-DNAT ") for r in rules):
        return  # some other user's port mapping is live: leave the chains
    for r in rules:
        args = shlex.split(r)
        builtin = args[0] == "-A" and args[1] in ("PREROUTING", "OUTPUT", "POSTROUTING")
        if builtin and any(f"-j {c}" in r for c in SHARED_CHAINS):
            subprocess.run(["iptables", "-t", "nat", "-D", *args[1:]], check=False)
    for chain in SHARED_CHAINS:
        subprocess.run(["iptables", "-t", "nat", "-F", chain], check=False, capture_output=True)
        subprocess.run(["iptables", "-t", "nat", "-X", chain], check=False, capture_output=True)


@pytest.fixture(scope="session")
def netenv() -> Iterator[NetEnv]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    pid = os.getpid()
    env = NetEnv(bridge=f"pcdt{pid % 10_000_000}", subnet=_pick_subnet(pid))
    forward_before = IP_FORWARD.read_text().strip()
    chains_before = {c for c in SHARED_CHAINS if f"-N {c}" in _nat_rules()}
    try:
        yield env
    finally:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=env.bridge)
            if idx:
                ipr.link("del", index=idx[0])
        IP_FORWARD.write_text(forward_before + "\n")
        if not chains_before:
            _remove_shared_chains_if_unused()


@pytest.fixture
async def manager(netenv: NetEnv, tmp_path: Path) -> AsyncIterator[NetworkManager]:
    m = NetworkManager(
        tmp_path / "state",
        CNI_DIRS,
        netns_dir=tmp_path / "netns",
        bridge=netenv.bridge,
        subnet=str(netenv.subnet),
    )
    try:
        yield m
    finally:
        # Whatever a failing test left attached is detached before its namespace goes.
        for id in await m.live_records():
            try:
                await m.teardown(id)
            except Exception as exc:
                print(f"cleanup teardown {id}: {exc}")
        unmount_netns_dir(tmp_path / "netns")
