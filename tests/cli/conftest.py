"""Fixtures for the ``pcd`` tests: the CLI as a subprocess against the session daemon.

Each test gets a namespace of its own (busybox loaded into it with ``pcd load``) and a
data root under its tmp_path. The exec root (network state, namespaces) is shared by the
session and holds a bridge network of the session's own (bridge ``pcdc<pid>`` on a /24
no host route uses), so the tests touch nothing of the host's ``pcd0``; the bridge, the
namespace directory's mount, ``ip_forward`` and the portmap chains are put back at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pyroute2 import IPRoute

from pycontainerd.network import default_bridge_conflist, unmount_netns_dir
from tests.network.conftest import (
    IP_FORWARD,
    SHARED_CHAINS,
    _missing,
    _nat_rules,
    _pick_subnet,
    _remove_shared_chains_if_unused,
)
from tests.support.daemon import REPO
from tests.support.images import busybox_image, write_oci_archive

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.daemon import Daemon

IMAGE = "example.com/cli/busybox:1"
_counter = itertools.count(1)


@dataclass(frozen=True)
class NetSetup:
    exec_root: Path
    bridge: str
    subnet: str


@pytest.fixture(scope="session")
def cli_net() -> Iterator[NetSetup]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    pid = os.getpid()
    # Another seed than tests/network's, so both sessions' subnets differ.
    subnet = _pick_subnet(pid * 3 + 1234)
    bridge = f"pcdc{pid % 10_000_000}"
    exec_root = Path(tempfile.mkdtemp(prefix="pcd-cli-", dir="/tmp"))
    net_d = exec_root / "net" / "net.d"
    net_d.mkdir(parents=True)
    doc = default_bridge_conflist(
        bridge=bridge, subnet=str(subnet), data_dir=exec_root / "net" / "ipam"
    )
    (net_d / "10-pycontainerd-bridge.conflist").write_text(json.dumps(doc))
    forward_before = IP_FORWARD.read_text().strip()
    chains_before = {c for c in SHARED_CHAINS if f"-N {c}" in _nat_rules()}
    try:
        yield NetSetup(exec_root, bridge, str(subnet))
    finally:
        unmount_netns_dir(exec_root / "netns")
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=bridge)
            if idx:
                ipr.link("del", index=idx[0])
        IP_FORWARD.write_text(forward_before + "\n")
        if not chains_before:
            _remove_shared_chains_if_unused()
        shutil.rmtree(exec_root, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed")
    path = tmp_path_factory.mktemp("cli-images") / "busybox.tar"
    write_oci_archive(path, {IMAGE: busybox_image()})
    return path


class Pcd:
    """Runs ``python -m pycontainerd.cli`` with this test's address, namespace and roots."""

    def __init__(self, daemon: Daemon, namespace: str, data_root: Path, exec_root: Path):
        self.namespace = namespace
        self.data_root = data_root
        self.exec_root = exec_root
        self.env = dict(os.environ)
        self.env.update(
            PCD_ADDRESS=daemon.address,
            PCD_NAMESPACE=namespace,
            PCD_DATA_ROOT=str(data_root),
            PCD_EXEC_ROOT=str(exec_root),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        self.env.pop("PCD_INSECURE_REGISTRIES", None)

    def argv(self, *args: str) -> list[str]:
        """The full command line (settings as options too, for callers that pass no env)."""
        return [
            sys.executable, "-m", "pycontainerd.cli", "-a", self.env["PCD_ADDRESS"],
            "-n", self.namespace, "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root), *args,
        ]  # fmt: skip

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self.argv(*args),
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return res

    def ok(self, *args: str, input: bytes | None = None) -> str:
        res = self(*args, input=input)
        assert res.returncode == 0, f"pcd {' '.join(args)} -> {res.returncode}: {res.stderr}"
        return res.stdout

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )

    def inspect(self, ref: str) -> dict[str, object]:
        doc = json.loads(self.ok("inspect", ref))
        assert isinstance(doc, list) and len(doc) == 1
        out: dict[str, object] = doc[0]
        return out


@pytest.fixture
def pcd_bare(daemon: Daemon, cli_net: NetSetup, tmp_path: Path) -> Pcd:
    """A namespace with nothing in it."""
    ns = f"cli-{os.getpid()}x{next(_counter)}"
    return Pcd(daemon, ns, tmp_path / "data", cli_net.exec_root)


@pytest.fixture
def pcd(pcd_bare: Pcd, busybox_archive: Path) -> Iterator[Pcd]:
    """A namespace holding the busybox image."""
    p = pcd_bare
    p.ok("load", "-i", str(busybox_archive))
    yield p
    # Whatever a failing test left running goes, with its network.
    ids = p("ps", "-a", "-q").stdout.split()
    if ids:
        p("rm", "-f", *ids)
