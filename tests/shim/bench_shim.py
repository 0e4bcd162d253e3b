"""Benchmark: our shim (zygote launcher / CLI ``start``) against containerd-shim-runc-v2.

Run as root: ``.venv/bin/python -m tests.shim.bench_shim [N]``. For each shim it runs N
sequential ``true`` containers (start shim → Create → Start → Wait → Delete → Shutdown),
reports the median time to the Create response and of the whole lifecycle, then starts
10 ``sleep`` containers and reports the mean PSS of their shim processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pycontainerd.api.runtime.task.v2 import shim_pb2 as api
from pycontainerd.api.types import mount_pb2
from pycontainerd.archive.tar import apply_layer
from pycontainerd.shim import launcher
from pycontainerd.ttrpc import Client
from tests.shim.conftest import NS, SERVICE, _kill_socket_owner
from tests.support.images import busybox_image

M = TypeVar("M", bound=Message)
GO_SHIM = shutil.which("containerd-shim-runc-v2")
_LOG_READERS: list[int] = []
MD = [("containerd-namespace-ttrpc", NS)]


async def start_ours(base: Path, id: str, bundle: Path) -> str:
    grpc = str(base / "d.sock")
    return await launcher.start_shim(NS, id, str(bundle), grpc, "", b"")


async def start_cli(base: Path, id: str, bundle: Path, binary: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *binary, "-namespace", NS, "-address", str(base / "d.sock"),
        "-publish-binary", "/bin/false", "-id", id, "start",
        cwd=bundle, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        env=dict(os.environ, TTRPC_ADDRESS=str(base / "d.sock.ttrpc")),
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode().strip()


def make_bundle(
    base: Path, lower: Path, spec: dict[str, Any], id: str, args: list[str]
) -> tuple[Path, list[mount_pb2.Mount]]:
    b = base / "b" / id
    b.mkdir(parents=True)
    cfg = json.loads(json.dumps(spec))
    cfg["process"]["args"] = args
    cfg["process"]["terminal"] = False
    cfg["root"] = {"path": "rootfs", "readonly": False}
    cfg["linux"]["cgroupsPath"] = f"/pcd-shim-bench/{base.parent.name}-{base.name}-{id}"
    (b / "config.json").write_text(json.dumps(cfg))
    # containerd makes a "log" FIFO in the bundle and reads it; its shim exits without it.
    os.mkfifo(b / "log", 0o700)
    _LOG_READERS.append(os.open(b / "log", os.O_RDONLY | os.O_NONBLOCK))
    o = base / "ovl" / id
    (o / "u").mkdir(parents=True)
    (o / "w").mkdir()
    opts = [f"lowerdir={lower}", f"upperdir={o / 'u'}", f"workdir={o / 'w'}"]
    return b, [mount_pb2.Mount(type="overlay", source="overlay", options=opts)]


async def rpc(c: Client, method: str, req: Message, resp: type[M]) -> M:
    return await c.call(SERVICE, method, req, resp, timeout_s=30, metadata=MD)


async def shutdown(c: Client, id: str) -> None:
    with contextlib.suppress(Exception):  # the shim may exit before it answers
        await rpc(c, "Shutdown", api.ShutdownRequest(id=id), empty_pb2.Empty)
    await c.close()


async def lifecycle(
    starter: str,
    base: Path,
    lower: Path,
    spec: dict[str, Any],
    id: str,
    args: list[str],
    keep: bool = False,
) -> tuple[float, float, Client | None]:
    b, mounts = make_bundle(base, lower, spec, id, args)
    t0 = time.perf_counter()
    if starter == "zygote":
        addr = await start_ours(base, id, b)
    elif starter == "cli":
        addr = await start_cli(base, id, b, [sys.executable, "-m", "pycontainerd.shim"])
    else:
        assert GO_SHIM
        addr = await start_cli(base, id, b, [GO_SHIM])
    c = await Client.connect(addr)
    req = api.CreateTaskRequest(id=id, bundle=str(b), rootfs=mounts)
    await rpc(c, "Create", req, api.CreateTaskResponse)
    t_create = time.perf_counter() - t0
    await rpc(c, "Start", api.StartRequest(id=id), api.StartResponse)
    if keep:
        return t_create, 0.0, c
    await rpc(c, "Wait", api.WaitRequest(id=id), api.WaitResponse)
    await rpc(c, "Delete", api.DeleteRequest(id=id), api.DeleteResponse)
    await shutdown(c, id)
    return t_create, time.perf_counter() - t0, None


def _zygote_pss(base: Path) -> int:
    """PSS of the zygote serving ``base`` (0 if none), found through its socket."""
    sock = base / "s" / "pyrunc-zygote"
    if not sock.exists():
        return 0
    inode = None
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[7] == str(sock):
            inode = parts[6]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pss_kb(int(pid))
        except OSError:
            continue
    return 0


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def prepare(base: Path, lower: Path) -> dict[str, Any]:
    apply_layer(lower, io.BytesIO(busybox_image().layers[0].tar_bytes()), overlay=False)
    subprocess.run(["runc", "spec"], cwd=base, check=True)
    spec: dict[str, Any] = json.loads((base / "config.json").read_text())
    return spec


async def main(n: int) -> None:
    base0 = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    lower = base0 / "lower"
    lower.mkdir()
    spec = prepare(base0, lower)
    starters = ["zygote", "cli"] + (["go"] if GO_SHIM else [])
    creates: dict[str, list[float]] = {k: [] for k in starters}
    totals: dict[str, list[float]] = {k: [] for k in starters}
    try:
        for starter in starters:
            (base0 / starter).mkdir()
            await lifecycle(starter, base0 / starter, lower, spec, "warm", ["true"])
        # Interleaved, so that load from elsewhere hits every shim alike.
        for i in range(n):
            for starter in starters:
                tc, tt, _ = await lifecycle(
                    starter, base0 / starter, lower, spec, f"r{i}", ["true"]
                )
                creates[starter].append(tc)
                totals[starter].append(tt)
        for starter in starters:
            base = base0 / starter
            clients = []
            for i in range(10):
                _, _, c = await lifecycle(
                    starter, base, lower, spec, f"s{i}", ["sleep", "1000"], keep=True
                )
                assert c is not None
                clients.append(c)
            await asyncio.sleep(1.0)
            pids = set()
            for i, c in enumerate(clients):
                info = await rpc(c, "Connect", api.ConnectRequest(id=f"s{i}"), api.ConnectResponse)
                pids.add(info.shim_pid)
            pss = sum(pss_kb(p) for p in pids) / len(clients) / 1024
            zyg = _zygote_pss(base) / len(clients) / 1024
            print(
                f"{starter:7s} create median {statistics.median(creates[starter]) * 1000:7.1f} ms"
                f"  lifecycle median {statistics.median(totals[starter]) * 1000:7.1f} ms"
                f"  shim PSS per container {pss:5.2f} MiB"
                f" ({len(pids)} processes; with the zygote {pss + zyg:5.2f} MiB)"
            )
            for i, c in enumerate(clients):
                await rpc(c, "Kill", api.KillRequest(id=f"s{i}", signal=9), empty_pb2.Empty)
                await rpc(c, "Wait", api.WaitRequest(id=f"s{i}"), api.WaitResponse)
                await rpc(c, "Delete", api.DeleteRequest(id=f"s{i}"), api.DeleteResponse)
                await shutdown(c, f"s{i}")
            sdir = base / "s"
            if sdir.is_dir():
                for sock in sdir.iterdir():
                    _kill_socket_owner(sock)
    finally:
        shutil.rmtree(base0, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
