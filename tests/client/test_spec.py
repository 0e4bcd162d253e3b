"""OCI spec generation without a daemon: containerd's defaults, the image config, user
resolution (CVE-2024-40635 range, CVE-2023-25173 groups), options, and the exports."""

from __future__ import annotations

import pytest

import pycontainerd.client as sdk
from pycontainerd.client.reference import normalize, parse
from pycontainerd.client.spec import Mount, Resources, UserDB, generate_spec, resolve_user
from pycontainerd.errdefs import InvalidArgument, NotFound

DB = UserDB(
    passwd="root:x:0:0::/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\nbig:x:4294967296:0::/:/x\n",
    group="root:x:0:\ndaemon:x:1:\nwheel:x:10:daemon,other\n",
)


def test_defaults_and_image_config() -> None:
    cfg = {"Env": ["A=1", "PATH=/bin"], "Entrypoint": ["/ep"], "Cmd": ["c1"], "WorkingDir": "/w"}
    spec = generate_spec("ns", "c", cfg, env=["A=2", "B=3"])
    proc = spec["process"]
    assert proc["args"] == ["/ep", "c1"]
    assert proc["env"] == ["PATH=/bin", "A=2", "B=3"]
    assert proc["cwd"] == "/w"
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert "inheritable" not in proc["capabilities"]
    assert len(proc["capabilities"]["bounding"]) == 14
    assert proc["noNewPrivileges"] is True
    linux = spec["linux"]
    assert linux["cgroupsPath"] == "/ns/c"
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert "/sys/devices/virtual/powercap" in linux["maskedPaths"]
    assert linux["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert generate_spec("ns", "c", cfg, args=["x"])["process"]["args"] == ["/ep", "x"]
    # The image config is copied, never shared between containers (CVE-2021-21334).
    assert cfg["Env"] == ["A=1", "PATH=/bin"]


def test_options() -> None:
    spec = generate_spec(
        "ns", "c", {"Cmd": ["sh"]}, tty=True, hostname="h", network="host",
        mounts=[Mount.bind("/src", "/dst", readonly=True)],
        resources=Resources(memory=64 << 20, cpus=0.5, pids=10),
    )  # fmt: skip
    assert spec["process"]["terminal"] is True
    assert spec["hostname"] == "h"
    assert "network" not in [n["type"] for n in spec["linux"]["namespaces"]]
    assert spec["mounts"][-1] == {
        "destination": "/dst", "type": "bind", "source": "/src", "options": ["rbind", "ro"],
    }  # fmt: skip
    res = spec["linux"]["resources"]
    assert res["memory"] == {"limit": 64 << 20}
    assert res["cpu"] == {"quota": 50_000, "period": 100_000}
    assert res["pids"] == {"limit": 10}
    priv = generate_spec("ns", "c", {"Cmd": ["sh"]}, privileged=True)
    assert "CAP_SYS_ADMIN" in priv["process"]["capabilities"]["bounding"]
    assert priv["linux"]["maskedPaths"] == []
    with pytest.raises(InvalidArgument):
        generate_spec("ns", "c", {})


def test_user_resolution() -> None:
    assert resolve_user("daemon", DB) == {"uid": 1, "gid": 1, "additionalGids": [1, 10]}
    assert resolve_user("1234", DB) == {"uid": 1234, "gid": 0, "additionalGids": [0]}
    assert resolve_user("1234:1234", DB) == {"uid": 1234, "gid": 1234, "additionalGids": [1234]}
    assert resolve_user("daemon:wheel", DB)["gid"] == 10
    for bad in ("4294967296", "2147483648", "nobody"):
        with pytest.raises(NotFound):
            resolve_user(bad, DB)
    with pytest.raises(NotFound):
        resolve_user("0:nogroup", DB)


def test_references() -> None:
    assert normalize("busybox") == "docker.io/library/busybox:latest"
    assert normalize("user/app:1") == "docker.io/user/app:1"
    r = parse("localhost:5000/a/b@sha256:" + "a" * 64)
    assert (r.host, r.repository, r.tag, r.object) == ("localhost:5000", "a/b", "", r.digest)
    for bad in ("Upper", "a:b:c", "x@sha256:12", "host:99999999999999/x:1 "):
        with pytest.raises(InvalidArgument):
            parse(bad)


def test_exported_members() -> None:
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None
    public = {n for n in dir(sdk) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(sdk.__all__)
