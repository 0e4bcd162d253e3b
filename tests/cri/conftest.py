"""Fixtures for the CRI tests: one daemon with the CRI plugin on a bridge of the session's
own, the busybox test image in namespace k8s.io, and CRI stubs over the daemon's socket."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from pyroute2 import IPRoute

from pycontainerd.api.cri.runtime.v1 import api_pb2_grpc
from tests.network.conftest import (
    IP_FORWARD,
    SHARED_CHAINS,
    _missing,
    _nat_rules,
    _pick_subnet,
    _remove_shared_chains_if_unused,
)
from tests.support.daemon import CTR, Daemon
from tests.support.tasks import IMAGE, PYRUNC_V1, RUNC_V2, import_busybox

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

SANDBOX_COMMAND = '["sh", "-c", "trap \'exit 0\' TERM; while :; do sleep 3600 & wait $!; done"]'


def _runtime(wanted: str) -> str | None:
    """``wanted``, or None when it cannot run here."""
    if shutil.which("runc") is None:
        return None
    if wanted == RUNC_V2 and not Path("/usr/bin/containerd-shim-runc-v2").is_file():
        return None
    return wanted


# The suite runs on our shim (the plugin's default) and on containerd's runc.v2 shim.
# PCD_CRI_RUNTIME picks one of them.
RUNTIMES = (
    [os.environ["PCD_CRI_RUNTIME"]]
    if os.environ.get("PCD_CRI_RUNTIME")
    else [
        PYRUNC_V1,
        RUNC_V2,
    ]
)


def cri_config(bridge: str, subnet: str, runtime: str, extra: str = "") -> str:
    return (
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        f'sandbox_image = "{IMAGE}"\n'
        f"sandbox_command = {SANDBOX_COMMAND}\n"
        f'runtime = "{runtime}"\n'
        f'cni_bridge = "{bridge}"\n'
        f'cni_subnet = "{subnet}"\n'
        'insecure_registries = ["127.0.0.1"]\n' + extra
    )


@pytest.fixture(scope="session", params=RUNTIMES)
def cri_daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    reason = _missing()
    runtime = _runtime(request.param)
    if reason is None and runtime is None:
        reason = f"runc or the {request.param} shim is not installed"
    if reason is None and CTR is None:
        reason = "needs containerd's ctr client to import the test image"
    if reason:
        pytest.skip(reason)
    assert runtime is not None
    pid = os.getpid()
    # Not the CLI tests' "pcdc<pid>": both suites run in one pytest process in CI.
    k = RUNTIMES.index(request.param)
    bridge = f"pcdk{k}{pid % 1_000_000}"
    subnet = _pick_subnet(pid + 17 + 7 * k)
    forward_before = IP_FORWARD.read_text().strip()
    chains_before = {c for c in SHARED_CHAINS if f"-N {c}" in _nat_rules()}
    d = Daemon(config=cri_config(bridge, str(subnet), runtime)).start()
    try:
        import_busybox(d, "k8s.io")
        yield d
    finally:
        d.cleanup()
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=bridge)
            if idx:
                ipr.link("del", index=idx[0])
        IP_FORWARD.write_text(forward_before + "\n")
        if not chains_before:
            _remove_shared_chains_if_unused()


class CRI:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        self.images = api_pb2_grpc.ImageServiceStub(channel)


@pytest.fixture
async def cri(cri_daemon: Daemon) -> AsyncIterator[CRI]:
    async with grpc.aio.insecure_channel("unix:" + cri_daemon.address) as ch:
        yield CRI(ch)
