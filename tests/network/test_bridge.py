"""Real CNI plugins on a real bridge: namespaces that ping each other, published ports,
IPs and iptables rules released on teardown and after a crash.

Needs root, containernetworking-plugins, iptables, nsenter and ping (skips otherwise).
Traffic only goes to namespaces these tests create and to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from pycontainerd.errdefs import AlreadyExists
from pycontainerd.network import NetworkManager, run_in_netns
from pycontainerd.network.allocations import list_leases
from tests.network.conftest import CNI_DIRS, NetEnv

pytestmark = pytest.mark.root

PID = os.getpid()


def cid(name: str) -> str:
    return f"pcdt{PID}-{name}"


async def nsexec(path: str, *cmd: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={path}",
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def _links() -> dict[str, tuple[bool, list[str]]]:
    """Interfaces of the calling thread's namespace: name -> (up, IPv4 addresses)."""
    out: dict[str, tuple[bool, list[str]]] = {}
    with IPRoute() as ipr:
        addrs: dict[int, list[str]] = {}
        for a in ipr.get_addr(family=socket.AF_INET):
            addrs.setdefault(a["index"], []).append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        for link in ipr.get_links():
            out[link.get_attr("IFLA_IFNAME")] = (
                bool(link["flags"] & 1),
                addrs.get(link["index"], []),
            )
    return out


async def bridge_ports(bridge: str) -> int:
    """How many interfaces are enslaved to ``bridge`` (pyroute2's sync API, off the loop)."""
    return await asyncio.to_thread(_bridge_ports, bridge)


def _bridge_ports(bridge: str) -> int:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=bridge)
        if not idx:
            return 0
        return sum(1 for link in ipr.get_links() if link.get_attr("IFLA_MASTER") == idx[0])


async def nat_rules(id: str) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "iptables", "-t", "nat", "-S", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return [line for line in out.decode().splitlines() if f'id: \\"{id}\\"' in line]


def free_port() -> int:
    for port in range(18000 + PID % 900, 18999):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18000-18999")


async def test_netns_lifecycle(manager: NetworkManager):
    # A stale mount point (its namespace gone) does not block the name.
    stale = manager.netns.directory / cid("ns")
    await asyncio.to_thread(stale.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(stale.touch)
    path = await manager.create_netns(cid("ns"))
    assert Path(path).parent == manager.netns.directory
    assert await manager.netns.exists(path)
    with pytest.raises(AlreadyExists):
        await manager.create_netns(cid("ns"))
    links = await run_in_netns(path, _links)
    assert list(links) == ["lo"]
    await manager.remove_netns(path)
    assert not await asyncio.to_thread(os.path.exists, path)
    await manager.remove_netns(path)  # already gone: quiet


async def test_two_namespaces_reach_each_other(manager: NetworkManager, netenv: NetEnv):
    a, b = cid("a"), cid("b")
    pa, pb = await manager.create_netns(a), await manager.create_netns(b)
    ra = await manager.setup(a, pa)
    rb = await manager.setup(b, pb)
    assert ra.ip is not None and rb.ip is not None and ra.ip != rb.ip
    for r in (ra, rb):
        assert r.ip is not None
        assert ipaddress.IPv4Address(r.ip) in netenv.subnet
        assert r.gateway == str(netenv.subnet.network_address + 1)
        assert r.ips[0].interface == "eth0"

    links = await run_in_netns(pa, _links)
    assert links["lo"][0] and links["eth0"][0]
    assert links["eth0"][1] == [f"{ra.ip}/{netenv.subnet.prefixlen}"]
    assert await bridge_ports(netenv.bridge) == 2

    rc, out = await nsexec(pa, "ping", "-c1", "-W2", rb.ip)
    assert rc == 0, out
    rc, out = await nsexec(pb, "ping", "-c1", "-W2", ra.ip)
    assert rc == 0, out
    rc, out = await nsexec(pa, "ping", "-c1", "-W2", "127.0.0.1")
    assert rc == 0, out

    await manager.teardown(a, pa)
    await manager.teardown(b, pb)
    assert await bridge_ports(netenv.bridge) == 0
    await manager.remove_netns(pa)
    await manager.remove_netns(pb)


async def test_published_port_reaches_server_in_namespace(manager: NetworkManager, tmp_path: Path):
    id = cid("web")
    path = await manager.create_netns(id)
    port = free_port()
    r = await manager.setup(id, path, [("127.0.0.1", port, 80, "tcp")])
    assert r.ip is not None
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text(f"hello from {id}\n")
    server = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={path}",
        sys.executable, "-m", "http.server", "80", "--bind", "0.0.0.0", "--directory", str(site),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        body = await _http_get("127.0.0.1", port, "/hello.txt")
        assert body.endswith(f"hello from {id}\n")
        rules = await nat_rules(id)
        assert any(f"--dports {port}" in rule for rule in rules), rules
    finally:
        server.kill()
        await server.wait()

    await manager.teardown(id, path)
    assert await nat_rules(id) == []
    # With the DNAT gone nothing answers on the host port any more.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await manager.remove_netns(path)


async def _http_get(host: str, port: int, target: str) -> str:
    """GET through the mapping, retrying (a bounded number of times) until the server is up."""
    last: Exception | None = None
    for _ in range(100):
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            last = exc
            await asyncio.sleep(0.1)
            continue
        writer.write(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        if data:
            return data.decode(errors="replace")
        await asyncio.sleep(0.1)
    raise AssertionError(f"server never answered on {host}:{port}: {last}")


async def test_teardown_releases_ip_and_rules(manager: NetworkManager, netenv: NetEnv):
    id = cid("rel")
    path = await manager.create_netns(id)
    r = await manager.setup(id, path, [("127.0.0.1", free_port(), 80, "tcp")])
    leases = list_leases(manager.ipam_dir, "bridge")
    assert [(lease.ip, lease.container_id, lease.ifname) for lease in leases] == [
        (r.ip, id, "eth0")
    ]
    rules = await nat_rules(id)
    assert rules  # masquerade and port-forward rules carry the id
    assert (await manager.attachment(id)) == r

    await manager.teardown(id, path)
    assert list_leases(manager.ipam_dir, "bridge") == []
    assert await nat_rules(id) == []
    assert await manager.attachment(id) is None
    assert await bridge_ports(netenv.bridge) == 0
    await manager.remove_netns(path)


async def test_none_network_has_only_loopback(manager: NetworkManager):
    id = cid("none")
    path = await manager.create_netns(id)
    r = await manager.setup(id, path, network="none")
    assert r.ips == ()
    links = await run_in_netns(path, _links)
    assert list(links) == ["lo"]
    assert links["lo"] == (True, ["127.0.0.1/8"])
    await manager.teardown(id, path)
    await manager.remove_netns(path)


async def test_reclaim_after_crash(manager: NetworkManager, netenv: NetEnv, tmp_path: Path):
    dead, alive = cid("dead"), cid("alive")
    pd, pa = await manager.create_netns(dead), await manager.create_netns(alive)
    await manager.setup(dead, pd, [("127.0.0.1", free_port(), 80, "tcp")])
    ra = await manager.setup(alive, pa)
    # A lease no record knows of, as a crash inside host-local's ADD would leave.
    stray = manager.ipam_dir / "bridge" / str(netenv.subnet.network_address + 200)
    stray.write_text("ghost\r\neth0")
    assert await nat_rules(dead)

    # The daemon "crashes": a new manager over the same directories, no memory of the old.
    del manager
    fresh = NetworkManager(
        tmp_path / "state",
        CNI_DIRS,
        netns_dir=tmp_path / "netns",
        bridge=netenv.bridge,
        subnet=str(netenv.subnet),
    )

    async def live() -> list[str]:
        return [alive]

    report = await fresh.reclaim(live)
    assert report.attachments == [dead]
    assert report.netns == [dead]
    assert report.leases == [f"bridge/{stray.name}"]
    assert report.errors == []
    assert not await asyncio.to_thread(os.path.exists, pd)
    assert await nat_rules(dead) == []
    assert [lease.container_id for lease in list_leases(fresh.ipam_dir, "bridge")] == [alive]
    assert await bridge_ports(netenv.bridge) == 1
    # The live container keeps its address and namespace.
    assert await asyncio.to_thread(os.path.exists, pa)
    assert await fresh.attachment(alive) == ra

    async def nobody() -> list[str]:
        return []

    report = await fresh.reclaim(nobody)
    assert report.attachments == [alive] and report.netns == [alive]
    assert list_leases(fresh.ipam_dir, "bridge") == []
    assert await bridge_ports(netenv.bridge) == 0


async def test_teardown_after_namespace_vanished(manager: NetworkManager, netenv: NetEnv):
    """The namespace is gone before teardown: IP, port and masquerade rules still go."""
    id = cid("gone")
    path = await manager.create_netns(id)
    await manager.setup(id, path, [("127.0.0.1", free_port(), 80, "tcp")])
    masq = [rule for rule in await nat_rules(id) if "MASQUERADE" in rule]
    assert masq
    await manager.remove_netns(path)  # the veth pair dies with the namespace

    await manager.teardown(id, path)
    assert await nat_rules(id) == []
    assert list_leases(manager.ipam_dir, "bridge") == []
    assert await manager.attachment(id) is None
    assert await bridge_ports(netenv.bridge) == 0


async def test_concurrent_setups_get_distinct_addresses(manager: NetworkManager, netenv: NetEnv):
    ids = [cid(f"many{i}") for i in range(6)]
    paths = await asyncio.gather(*(manager.create_netns(i) for i in ids))
    results = await asyncio.gather(*(manager.setup(i, p) for i, p in zip(ids, paths, strict=True)))
    ips = {r.ip for r in results}
    assert len(ips) == len(ids)
    assert await bridge_ports(netenv.bridge) == len(ids)
    rc, out = await nsexec(paths[0], "ping", "-c1", "-W2", str(results[-1].ip))
    assert rc == 0, out
    await asyncio.gather(*(manager.teardown(i, p) for i, p in zip(ids, paths, strict=True)))
    await asyncio.gather(*(manager.remove_netns(p) for p in paths))
    assert list_leases(manager.ipam_dir, "bridge") == []
    assert await bridge_ports(netenv.bridge) == 0
