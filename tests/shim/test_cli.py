"""The shim binary protocol (``start``/``delete``), detachment, fd hygiene and crash cleanup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from pycontainerd.api.runtime.runc.options import oci_pb2
from pycontainerd.api.runtime.task.v2 import shim_pb2 as api
from pycontainerd.errdefs import NotFound
from pycontainerd.shim import address
from pycontainerd.ttrpc import Client
from tests.shim.conftest import NS, ShimEnv, call, empty, exists, mounted, requires_runc
from tests.support.daemon import REPO

pytestmark = [requires_runc, pytest.mark.root]


def shim_cmd(env: ShimEnv, id: str, action: str) -> list[str]:
    return [
        sys.executable, "-m", "pycontainerd.shim", "-namespace", NS, "-address",
        env.grpc_address, "-publish-binary", "/bin/false", "-id", id, action,
    ]  # fmt: skip


def shim_env_vars(env: ShimEnv, **extra: str) -> dict[str, str]:
    e = dict(os.environ, TTRPC_ADDRESS=env.ttrpc_address, **extra)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH", "")]))
    return e


def runc_options() -> bytes:
    opts = oci_pb2.Options(binary_name="runc")
    return any_pb2.Any(
        type_url="containerd.runc.v1.Options", value=opts.SerializeToString()
    ).SerializeToString()


async def cli_start(env: ShimEnv, id: str, bundle: str, **extra: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *shim_cmd(env, id, "start"),
        cwd=bundle,
        env=shim_env_vars(env, **extra),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate(runc_options())
    assert proc.returncode == 0, err.decode()
    return out.decode()


def fd_listing(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("zygote", ["1", "0"])
async def test_start_action_detached_server(shim_env: ShimEnv, zygote: str) -> None:
    b = shim_env.bundle("k1", ["ls", "-1", "/proc/self/fd"])
    addr = await cli_start(shim_env, "k1", str(b), PYCONTAINERD_SHIM_ZYGOTE=zygote)
    assert addr == address.socket_address(shim_env.grpc_address, NS, "k1")
    assert (b / "address").read_text() == addr
    sock_path = addr.removeprefix("unix://")
    assert os.stat(sock_path).st_mode & 0o777 == 0o600
    client = await Client.connect(addr)
    shim_env.clients.append(client)
    out = shim_env.reader("k1", "stdout")
    await shim_env.create(client, "k1", b, stdout=str(out.path))
    info = await call(client, "Connect", api.ConnectRequest(id="k1"), api.ConnectResponse)
    ppid, sid = _ppid_sid(info.shim_pid)
    assert sid != os.getsid(0)  # a session of its own
    assert ppid != os.getpid()
    assert os.readlink(f"/proc/{info.shim_pid}/cwd") == str(b)
    # Only the shim's own things are open: no FIFO of the test, no inherited pipes of ours.
    fds = fd_listing(info.shim_pid)
    assert not [f for f in fds if f.startswith("/tmp/") and "fifo" not in f], fds
    await call(client, "Start", api.StartRequest(id="k1"), api.StartResponse)
    waited = await call(client, "Wait", api.WaitRequest(id="k1"), api.WaitResponse)
    assert waited.exit_status == 0
    # The container sees 0, 1, 2 and ls's own directory fd: nothing leaked into it.
    assert (await out.eof()).split() == [b"0", b"1", b"2", b"3"]
    await call(client, "Delete", api.DeleteRequest(id="k1"), api.DeleteResponse)
    await empty(client, "Shutdown", api.ShutdownRequest(id="k1"))
    for _ in range(200):
        if not exists(f"/proc/{info.shim_pid}") or _zombie(info.shim_pid):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("shim did not exit after Shutdown")
    assert not exists(sock_path)


def _ppid_sid(pid: int) -> tuple[int, int]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[1]), int(stat[3])


def _runc_knows(root: str, id: str) -> bool:
    return (
        subprocess.run(["runc", "--root", root, "state", id], capture_output=True).returncode == 0
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_start_reuses_live_shim_for_same_address(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("k2", ["sleep", "1000"])
    first = await cli_start(shim_env, "k2", str(b))
    second = await cli_start(shim_env, "k2", str(b))
    assert first == second
    client = await Client.connect(first)
    shim_env.clients.append(client)
    await empty(client, "Shutdown", api.ShutdownRequest(id="k2"))


async def test_shim_killed_then_delete_action_cleans_up(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("k3", ["sleep", "1000"])
    addr = await cli_start(shim_env, "k3", str(b))
    client = await Client.connect(addr)
    shim_env.clients.append(client)
    created = await shim_env.create(client, "k3", b)
    await call(client, "Start", api.StartRequest(id="k3"), api.StartResponse)
    info = await call(client, "Connect", api.ConnectRequest(id="k3"), api.ConnectResponse)
    assert mounted(b / "rootfs")
    os.kill(info.shim_pid, signal.SIGKILL)
    proc = await asyncio.create_subprocess_exec(
        *shim_cmd(shim_env, "k3", "delete"),
        cwd=str(b),
        env=shim_env_vars(shim_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    resp = api.DeleteResponse.FromString(out)
    assert resp.exit_status == 137
    assert resp.pid == created.pid
    assert resp.exited_at.seconds > 0
    assert not mounted(b / "rootfs")
    assert not exists(addr.removeprefix("unix://"))
    for _ in range(200):
        if not exists(f"/proc/{created.pid}") or _zombie(created.pid):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("container init survived the delete action")
    root = os.path.join(address.runc_root(shim_env.grpc_address), NS)
    assert not _runc_knows(root, "k3")


async def test_one_process_serves_several_shims(shim_env: ShimEnv) -> None:
    """Shim sockets share a process (memory); each still shuts down on its own."""
    clients = {}
    for id in ("m1", "m2"):
        b = shim_env.bundle(id, ["sleep", "1000"])
        clients[id] = await shim_env.start(id, b)
        await shim_env.create(clients[id], id, b)
    pids = set()
    for id, c in clients.items():
        info = await call(c, "Connect", api.ConnectRequest(id=id), api.ConnectResponse)
        pids.add(info.shim_pid)
    assert len(pids) == 1
    # Each socket serves only its own containers.
    with pytest.raises(NotFound):
        await call(clients["m1"], "State", api.StateRequest(id="m2"), api.StateResponse)
    await call(clients["m1"], "Delete", api.DeleteRequest(id="m1"), api.DeleteResponse)
    await empty(clients["m1"], "Shutdown", api.ShutdownRequest(id="m1"))
    m1_sock = address.socket_address(shim_env.grpc_address, NS, "m1").removeprefix("unix://")
    for _ in range(200):
        if not exists(m1_sock):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("m1's socket outlived its Shutdown")
    await call(clients["m2"], "Start", api.StartRequest(id="m2"), api.StartResponse)
    await empty(clients["m2"], "Kill", api.KillRequest(id="m2", signal=signal.SIGKILL))
    waited = await call(clients["m2"], "Wait", api.WaitRequest(id="m2"), api.WaitResponse)
    assert waited.exit_status == 137
    await call(clients["m2"], "Delete", api.DeleteRequest(id="m2"), api.DeleteResponse)
    await empty(clients["m2"], "Shutdown", api.ShutdownRequest(id="m2"))


def _start_zygote(path: str) -> None:
    """``python -m pycontainerd.shim.zygote PATH``; returns when its first process exits,
    which it does once the socket listens (or at once when it is not needed)."""
    subprocess.run(
        [sys.executable, "-m", "pycontainerd.shim.zygote", path],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _zygote_pid(path: str) -> int:
    return int(Path(path + ".lock").read_text() or 0)


def test_retired_zygote_gives_way_to_its_successor(tmp_path: Path) -> None:
    """A restarted daemon removes the old zygote's socket and may need a new zygote at
    once: the new one must take over then, not be refused while the old one still holds
    the directory's lock (the daemon then waited 10 s before spawning a shim itself)."""
    path = str(tmp_path / "z.sock")
    _start_zygote(path)
    old = _zygote_pid(path)
    assert old > 0 and Path(path).exists()
    _start_zygote(path)  # a live zygote serves the directory: nothing changes
    assert _zygote_pid(path) == old
    os.unlink(path)  # retired
    _start_zygote(path)
    try:
        assert Path(path).exists()
        new = _zygote_pid(path)
        assert new not in (0, old)
        for _ in range(500):
            if not Path(f"/proc/{old}").exists() or _zombie(old):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"retired zygote {old} still runs")
    finally:
        os.unlink(path)  # the new zygote sees its socket gone and exits
