"""Fixtures for SDK tests: a Client on a fresh namespace of our daemon, or of real
containerd (``any_daemon`` is parametrized over both; containerd is skipped with a
reason when it is not installed or we are not root), and busybox archives."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pycontainerd.client import Client
from tests.support.containerd import CONTAINERD, Containerd
from tests.support.images import busybox_image, write_docker_archive, write_oci_archive

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from tests.support.daemon import Daemon

BUSYBOX_REF = "example.com/sdk/busybox:1"
_counter = itertools.count(1)


def unique_ns(prefix: str = "sdk") -> str:
    return f"{prefix}-{os.getpid()}x{next(_counter)}"


@pytest.fixture(scope="session")
def containerd() -> Iterator[Daemon]:
    if CONTAINERD is None:
        pytest.skip("containerd is not installed (apt install containerd)")
    if os.geteuid() != 0:
        pytest.skip("real containerd needs root")
    d = Containerd().start()
    yield d
    d.cleanup()


@pytest.fixture(params=["pycontainerd", "containerd"])
def any_daemon(request: pytest.FixtureRequest) -> Daemon:
    """Our daemon, then real containerd: SDK behaviour must be the same on both."""
    name = "daemon" if request.param == "pycontainerd" else "containerd"
    d: Daemon = request.getfixturevalue(name)
    return d


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    async with Client(daemon.address, unique_ns()) as c:
        yield c


@pytest.fixture
async def any_client(any_daemon: Daemon) -> AsyncIterator[Client]:
    async with Client(any_daemon.address, unique_ns()) as c:
        yield c


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """busybox as an OCI archive and as a docker-save archive."""
    if shutil.which("busybox") is None and not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed")
    d = tmp_path_factory.mktemp("archives")
    oci = d / "busybox-oci.tar"
    write_oci_archive(oci, {BUSYBOX_REF: busybox_image()})
    docker = d / "busybox-docker.tar"
    write_docker_archive(docker, ["sdk/busybox:docker"], busybox_image(flavor="docker"))
    return {"oci": oci, "docker": docker}
