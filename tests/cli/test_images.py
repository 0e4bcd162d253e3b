"""Image commands: images/tag/save/load/rmi/prune, and push then pull through Debian's
``docker-registry`` on 127.0.0.1 (plain HTTP, marked insecure)."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest

from pycontainerd.cli.progress import ProgressDisplay
from pycontainerd.client import Progress
from tests.cli.conftest import IMAGE
from tests.support.containerd import CONTAINERD, Containerd

if TYPE_CHECKING:
    import io
    from pathlib import Path

    from tests.cli.conftest import Pcd
    from tests.client.registry_support import RegistryServer

pytestmark = pytest.mark.root


def _digest(pcd: Pcd, name: str) -> str:
    doc = pcd.inspect(name)
    target = doc["Target"]
    assert isinstance(target, dict)
    return str(target["digest"])


def test_images_tag_save_load_rmi_prune(pcd: Pcd, tmp_path: Path) -> None:
    table = pcd.ok("images").splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "DIGEST", "SIZE", "CREATED"]
    assert table[1].split()[:2] == ["example.com/cli/busybox", "1"]
    pcd.ok("tag", IMAGE, "mybox:2")
    assert "docker.io/library/mybox:2" in pcd.ok("images", "-q").split()
    assert _digest(pcd, "mybox:2") == _digest(pcd, IMAGE)  # the short name resolves
    archive = tmp_path / "out.tar"
    pcd.ok("save", "-o", str(archive), "mybox:2")
    pcd.ok("image", "rm", "mybox:2")
    assert "mybox" not in pcd.ok("images")
    assert "Loaded image: docker.io/library/mybox:2" in pcd.ok("load", "-i", str(archive))
    assert pcd.ok("run", "--rm", "mybox:2", "echo", "from-saved") == "from-saved\n"
    # In use: refused; prune -a spares it and removes the unused one.
    pcd.ok("run", "--name", "user", IMAGE, "true")
    res = pcd("rmi", IMAGE)
    assert res.returncode == 1 and "used by container" in res.stderr
    pcd.ok("image", "prune", "-a")
    assert pcd.ok("images", "-q").split() == [IMAGE]
    res = pcd("image", "rm", "no/such:1")
    assert res.returncode == 1 and "no such image" in res.stderr


def test_push_rm_pull_round_trip(pcd: Pcd, registry: RegistryServer) -> None:
    remote = f"{registry.host}/cli/busybox:rt"
    insecure = ["--insecure-registry", registry.host]
    res = pcd("push", IMAGE, remote)
    assert res.returncode == 1 and "push" in res.stderr  # HTTPS to a plain registry fails
    out = pcd.ok("push", *insecure, IMAGE, remote)
    assert out.startswith(f"{remote}: digest: sha256:")
    before = _digest(pcd, IMAGE)
    pcd.ok("rmi", IMAGE)
    res = pcd("pull", *insecure, remote)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == remote
    assert "Complete" in res.stderr  # plain progress lines: stderr is not a terminal
    assert _digest(pcd, remote) == before
    assert pcd.ok("run", "--rm", remote, "echo", "pulled") == "pulled\n"
    res = pcd("pull", *insecure, f"{registry.host}/cli/missing:1")
    assert res.returncode == 1 and "not found" in res.stderr.lower()


def test_progress_bars_on_a_terminal(tmp_path: Path) -> None:
    out_path = tmp_path / "tty.txt"
    with out_path.open("w") as out:
        display = ProgressDisplay(out, tty=True)
        _feed(display)
        display.close()
    text = out_path.read_text()
    assert "\x1b[2K" in text and "[" in text and "/s" in text  # redrawn bars with a rate
    with out_path.open("w") as out:
        display = ProgressDisplay(out, tty=False)
        _feed(display)
    lines = out_path.read_text().splitlines()
    assert "\x1b" not in "".join(lines)
    assert [ln.split(":")[1].strip() for ln in lines if ln.startswith("aaaa")] == [
        "Downloading 2MB",
        "Complete 2MB",
    ]


def _feed(display: ProgressDisplay | io.TextIOBase) -> None:
    assert isinstance(display, ProgressDisplay)
    digest = "sha256:" + "a" * 64
    display(Progress("start", digest, 0, 2_000_000))
    for n in range(1, 5):
        display(Progress("bytes", digest, n * 500_000, 2_000_000))
    display(Progress("done", digest, 2_000_000, 2_000_000))


def test_pull_through_the_pull_service_or_the_sdk(pcd: Pcd, registry: RegistryServer) -> None:
    """Against our daemon ``pcd pull`` is one call of its Pull service on a bare HTTP/2
    connection (cli/quickpull.py); against a daemon without it (containerd answers
    UNIMPLEMENTED) the same command pulls through the SDK, client-side."""
    remote = f"{registry.host}/cli/busybox:both"
    insecure = ["--insecure-registry", registry.host]
    pcd.ok("push", *insecure, IMAGE, remote)
    pcd.ok("rmi", IMAGE)
    res = pcd("pull", *insecure, remote)
    assert res.returncode == 0 and res.stdout.strip() == remote, res.stderr
    assert f"Pulled {remote} (sha256:" in res.stderr
    if CONTAINERD is None:
        pytest.skip("containerd is not installed: the SDK fallback is not exercised")
    real = Containerd().start()
    try:
        argv = pcd.argv("pull", *insecure, remote)
        argv[argv.index("-a") + 1] = real.address
        env = dict(pcd.env, PCD_ADDRESS=real.address)
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == remote, res.stderr
        listed = real.ctr("images", "ls", "-q", namespace=pcd.namespace).stdout.split()
        assert remote in listed
    finally:
        real.cleanup()
