"""The CNI calling convention, checked with small plugins of our own (no root needed).

Each test plugin is a real executable in a tmp bin dir that records its environment and
stdin and answers as the spec says, so these tests see exactly what a plugin would see:
CNI_* variables, ``prevResult`` chaining, ``runtimeConfig`` filtered by capabilities,
reverse order on DEL, and the error object on failure.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import pytest

from pycontainerd.errdefs import InvalidArgument, NotFound
from pycontainerd.network import (
    NetworkManager,
    PluginError,
    parse_publish,
    spec_network_namespace,
)
from pycontainerd.network.cni import CNIRunner, RuntimeConf, load_conf_dir, parse_config
from pycontainerd.network.portmap import PortMapping, to_capability

if TYPE_CHECKING:
    from pathlib import Path

# A plugin that logs its call to $LOG and answers per its own name:
#   rec-*   : ADD appends an IP to prevResult (or starts a result), DEL/CHECK say nothing
#   fail    : ADD reports a CNI error object and exits 1
PLUGIN = r"""#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
conf = json.load(sys.stdin)
log = os.environ["PCD_TEST_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{
        "plugin": name,
        "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}},
        "conf": conf,
    }}) + "\n")
cmd = os.environ["CNI_COMMAND"]
if cmd == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}}))
    sys.exit(0)
if name == "fail" and cmd == "ADD":
    print(json.dumps({{"cniVersion": "1.0.0", "code": 11, "msg": "no way", "details": "x"}}))
    sys.exit(1)
if cmd == "ADD":
    res = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": [
        {{"name": os.environ["CNI_IFNAME"], "sandbox": os.environ["CNI_NETNS"]}}], "ips": []}}
    n = len(res["ips"]) + 2
    res["ips"].append({{"address": "10.1.0.%d/24" % n, "gateway": "10.1.0.1", "interface": 0}})
    print(json.dumps(res))
"""


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("rec-a", "rec-b", "fail", "loopback"):
        p = d / name
        p.write_text(PLUGIN.format(python=sys.executable))
        p.chmod(0o755)
    monkeypatch.setenv("PCD_TEST_LOG", str(tmp_path / "calls.jsonl"))
    return d


def _calls(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_conf(conf_dir: Path, doc: dict[str, Any], name: str = "10-test.conflist") -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / name).write_text(json.dumps(doc))


CHAIN: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "chain",
    "plugins": [
        {"type": "rec-a", "capabilities": {"portMappings": True}, "x": 1},
        {"type": "rec-b"},
    ],
}


async def test_add_chains_prev_result_and_filters_capabilities(bin_dir: Path, tmp_path: Path):
    runner = CNIRunner((str(bin_dir),))
    conf = parse_config(json.dumps(CHAIN))
    caps = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    rt = RuntimeConf("ctr1", "/run/x/ns", "eth0", (("K8S_POD_NAME", "p"),), caps)
    result = await runner.add_list(conf, rt)

    assert [ip["address"] for ip in result["ips"]] == ["10.1.0.2/24", "10.1.0.3/24"]
    first, second = _calls(tmp_path)
    assert first["plugin"] == "rec-a" and second["plugin"] == "rec-b"
    env = first["env"]
    assert isinstance(env, dict)
    assert env["CNI_COMMAND"] == "ADD"
    assert env["CNI_CONTAINERID"] == "ctr1"
    assert env["CNI_NETNS"] == "/run/x/ns"
    assert env["CNI_IFNAME"] == "eth0"
    assert env["CNI_ARGS"] == "K8S_POD_NAME=p"
    assert env["CNI_PATH"] == str(bin_dir)
    c1, c2 = first["conf"], second["conf"]
    assert isinstance(c1, dict) and isinstance(c2, dict)
    # name and version are injected into every plugin's config; prevResult only after one ran
    assert c1["name"] == c2["name"] == "chain"
    assert c1["cniVersion"] == c2["cniVersion"] == "1.0.0"
    assert "prevResult" not in c1
    assert c2["prevResult"]["ips"][0]["address"] == "10.1.0.2/24"
    # only the plugin declaring the capability gets runtimeConfig
    assert c1["runtimeConfig"] == caps
    assert "runtimeConfig" not in c2


async def test_del_runs_in_reverse_with_cached_result(bin_dir: Path, tmp_path: Path):
    runner = CNIRunner((str(bin_dir),))
    conf = parse_config(json.dumps(CHAIN))
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]}
    await runner.del_list(conf, RuntimeConf("ctr1", "", "eth0"), prev)
    calls = _calls(tmp_path)
    assert [c["plugin"] for c in calls] == ["rec-b", "rec-a"]
    for c in calls:
        assert isinstance(c["env"], dict) and isinstance(c["conf"], dict)
        assert c["env"]["CNI_COMMAND"] == "DEL"
        assert c["conf"]["prevResult"] == prev


async def test_plugin_error_object_is_reported(bin_dir: Path):
    runner = CNIRunner((str(bin_dir),))
    conf = parse_config(json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "fail"}))
    with pytest.raises(PluginError) as info:
        await runner.add_list(conf, RuntimeConf("c", "/x", "eth0"))
    assert info.value.cni_code == 11
    assert "no way" in str(info.value) and "fail" in str(info.value)


async def test_version_and_missing_plugin(bin_dir: Path):
    runner = CNIRunner((str(bin_dir),))
    assert await runner.version("rec-a") == ["0.4.0", "1.0.0"]
    with pytest.raises(NotFound):
        await runner.version("nope")


async def test_manager_records_and_undoes_a_failed_setup(bin_dir: Path, tmp_path: Path):
    """A failing plugin in the list makes setup roll back: DEL runs and no record stays."""
    conf_dir = tmp_path / "net.d"
    _write_conf(
        conf_dir,
        {
            "cniVersion": "1.0.0",
            "name": "bad",
            "plugins": [{"type": "rec-a"}, {"type": "fail"}],
        },
    )
    m = NetworkManager(tmp_path / "state", (str(bin_dir),), conf_dir, netns_dir=tmp_path / "ns")
    with pytest.raises(PluginError):
        await m.setup("c1", str(tmp_path / "no-ns"), network="bad")
    cmds = [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in _calls(tmp_path)]  # type: ignore[index]
    assert ("rec-a", "ADD") in cmds and ("fail", "ADD") in cmds
    assert ("fail", "DEL") in cmds and ("rec-a", "DEL") in cmds  # the rollback
    assert await m.attachment("c1") is None
    assert await m.live_records() == []


async def test_manager_teardown_passes_what_add_saw(bin_dir: Path, tmp_path: Path):
    conf_dir = tmp_path / "net.d"
    _write_conf(conf_dir, CHAIN)
    m = NetworkManager(tmp_path / "state", (str(bin_dir),), conf_dir, netns_dir=tmp_path / "ns")
    r = await m.setup("c1", str(tmp_path / "no-ns"), [("127.0.0.1", 8080, 80, "tcp")], "chain")
    assert r.ip == "10.1.0.2"
    assert [c.ip for c in r.ips] == ["10.1.0.2", "10.1.0.3"]
    assert r.gateway == "10.1.0.1"
    # The config changes on disk; DEL must still get the list and ports of the ADD.
    _write_conf(conf_dir, {**CHAIN, "plugins": [{"type": "rec-b"}]})
    await m.load()
    (tmp_path / "calls.jsonl").unlink()
    await m.teardown("c1")
    calls = _calls(tmp_path)
    dels = [c for c in calls if c["env"]["CNI_COMMAND"] == "DEL"]  # type: ignore[index]
    # (no loopback DEL: the namespace is gone, and lo went with it)
    assert [c["plugin"] for c in dels] == ["rec-b", "rec-a"]
    assert dels[1]["conf"]["runtimeConfig"]["portMappings"][0]["hostIP"] == "127.0.0.1"  # type: ignore[index]
    assert dels[1]["conf"]["prevResult"]["ips"][1]["address"] == "10.1.0.3/24"  # type: ignore[index]
    assert await m.attachment("c1") is None
    await m.teardown("c1")  # a second teardown is a no-op


async def test_default_conflist_is_written(tmp_path: Path):
    m = NetworkManager(tmp_path / "state", bridge="pcdx0", subnet="10.222.0.0/24")
    nets = await m.networks()
    conf = nets["bridge"]
    assert [p["type"] for p in conf.plugins] == ["bridge", "portmap"]
    bridge = conf.plugins[0]
    assert bridge["bridge"] == "pcdx0"
    assert bridge["isGateway"] and bridge["ipMasq"] and bridge["hairpinMode"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.222.0.0/24"}]]
    assert bridge["ipam"]["dataDir"] == str(tmp_path / "state" / "ipam")
    assert conf.plugins[1]["capabilities"] == {"portMappings": True}
    assert load_conf_dir(tmp_path / "state" / "net.d")["bridge"].plugins == conf.plugins
    # A configured network of that name is used as is, not overwritten.
    custom = {**CHAIN, "name": "bridge"}
    _write_conf(tmp_path / "own", custom, "05-mine.conflist")
    m2 = NetworkManager(tmp_path / "state2", conf_dir=tmp_path / "own")
    assert (await m2.networks())["bridge"].plugins[0]["type"] == "rec-a"
    assert sorted(os.listdir(tmp_path / "own")) == ["05-mine.conflist"]


async def test_status_names_a_missing_plugin(bin_dir: Path, tmp_path: Path):
    m = NetworkManager(tmp_path / "state", (str(bin_dir),), netns_dir=tmp_path / "ns")
    with pytest.raises(NotFound, match="bridge"):
        await m.status()
    for name in ("bridge", "host-local", "portmap"):
        (bin_dir / name).symlink_to(bin_dir / "rec-a")
    await m.status()


async def test_host_network_needs_nothing(tmp_path: Path):
    m = NetworkManager(tmp_path / "state", ("/nonexistent",), netns_dir=tmp_path / "ns")
    r = await m.setup("c1", None, network="host")
    assert r.ips == () and r.ip is None
    assert spec_network_namespace("host", None) is None
    assert spec_network_namespace("bridge", "/x/c1") == {"type": "network", "path": "/x/c1"}
    # The daemon's own namespace is refused for the other modes: it would rewire the host.
    with pytest.raises(InvalidArgument):
        await m.setup("c1", "/proc/self/ns/net", network="none")
    with pytest.raises(InvalidArgument):
        await m.setup("c1", None, network="bridge")


def test_bad_configs_are_rejected():
    with pytest.raises(InvalidArgument):
        parse_config("{")
    with pytest.raises(InvalidArgument):
        parse_config(json.dumps({"cniVersion": "0.1.0", "name": "n", "type": "x"}))
    with pytest.raises(InvalidArgument):
        parse_config(json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": []}))
    with pytest.raises(InvalidArgument):
        parse_config(json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "../x"}))
    with pytest.raises(InvalidArgument):
        parse_config(json.dumps({"cniVersion": "1.0.0", "name": "a b", "type": "x"}))


def test_publish_parsing():
    assert parse_publish("127.0.0.1:18080:80") == PortMapping("127.0.0.1", 18080, 80, "tcp")
    assert parse_publish("8080:80/udp") == PortMapping("", 8080, 80, "udp")
    assert parse_publish("[::1]:8080:80").host_ip == "::1"
    for bad in ("80", "a:1:2", "1:2:3:4", "70000:80", "1.2.3.4:0:80", "80:80/icmp"):
        with pytest.raises(InvalidArgument):
            parse_publish(bad)
    with pytest.raises(InvalidArgument):
        to_capability([PortMapping("", 80, 80), PortMapping("", 80, 81)])
    assert to_capability([PortMapping("", 80, 81, "udp")]) == [
        {"hostPort": 80, "containerPort": 81, "protocol": "udp"}
    ]
