"""Named network namespaces made in-process (no CNI needed): each is a new namespace,
no thread of ours is left in it, concurrent creates are distinct, and the bind mount
propagates into other mount namespaces.

Needs root (skips otherwise); the propagation test also needs util-linux ``unshare``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pycontainerd.errdefs import AlreadyExists, NotFound
from pycontainerd.network.netns import NetnsStore, is_netns, run_in_netns, unmount_netns_dir

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.root

_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NetnsStore]:
    s = NetnsStore(tmp_path / "netns")
    try:
        yield s
    finally:
        unmount_netns_dir(s.directory)


def _ino(path: str | os.PathLike[str]) -> int:
    return os.stat(path).st_ino


def _thread_namespaces() -> dict[str, int]:
    """Thread id -> inode of that thread's network namespace, for every thread of ours."""
    out: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[tid] = _ino(f"/proc/self/task/{tid}/ns/net")
        except FileNotFoundError:
            continue  # the thread ended while we looked
    return out


def _interfaces() -> dict[str, bool]:
    """Interfaces of the calling thread's namespace: name -> up."""
    out: dict[str, bool] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("16sh22x", name.encode(), 0)
            flags = struct.unpack("16sh22x", fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
            out[name] = bool(flags & _IFF_UP)
    return out


def _is_shared_mount_point(directory: Path) -> bool:
    """True when ``directory`` is a mount point in a shared peer group (mountinfo)."""
    target = os.fspath(directory.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            optional = fields[6 : fields.index("-")]
            if fields[4] == target and any(o.startswith("shared:") for o in optional):
                return True
    return False


async def test_created_namespace_is_new_and_has_only_lo_down(store: NetnsStore):
    path = await store.create("a")
    assert path == store.directory / "a"
    assert await store.exists(path)
    assert _ino(path) != _ino("/proc/self/ns/net")
    assert await run_in_netns(path, _interfaces) == {"lo": False}


async def test_no_thread_changes_namespace(store: NetnsStore):
    host = _ino("/proc/self/ns/net")
    assert set(_thread_namespaces().values()) == {host}
    paths = await asyncio.gather(*(store.create(f"t{i}") for i in range(8)))
    # The creating threads are joined before create returns.
    assert not any(t.name == "pcd-netns-create" for t in threading.enumerate())
    await run_in_netns(paths[0], _interfaces)
    # The pool threads that ran the creates are still alive here; each of them, the loop
    # thread and the main thread must still be in the host namespace, and so must a
    # run_in_netns thread that has handed its result over but not quite ended yet.
    seen = _thread_namespaces()
    assert set(seen.values()) == {host}, seen


async def test_concurrent_creates_are_distinct(store: NetnsStore):
    names = sorted(f"c{i}" for i in range(20))
    paths = await asyncio.gather(*(store.create(n) for n in names))
    assert sorted(p.name for p in paths) == names
    assert all(await asyncio.gather(*(store.exists(p) for p in paths)))
    inodes = {_ino(p) for p in paths}
    assert len(inodes) == 20
    assert _ino("/proc/self/ns/net") not in inodes
    assert sorted(await store.list()) == names
    assert all(await asyncio.gather(*(store.remove(p) for p in paths)))
    assert await store.list() == {}


async def test_create_existing_name_is_already_exists(store: NetnsStore):
    path = await store.create("dup")
    before = _ino(path)
    with pytest.raises(AlreadyExists):
        await store.create("dup")
    assert _ino(path) == before  # the existing namespace is untouched
    # Two racing creates of one fresh name: exactly one wins.
    results = await asyncio.gather(
        store.create("race"), store.create("race"), return_exceptions=True
    )
    assert sum(isinstance(r, Path) for r in results) == 1
    assert sum(isinstance(r, AlreadyExists) for r in results) == 1
    assert is_netns(store.directory / "race")


async def test_stale_file_does_not_block_the_name(store: NetnsStore):
    await asyncio.to_thread(store.directory.mkdir, parents=True)
    await asyncio.to_thread((store.directory / "stale").touch)
    path = await store.create("stale")
    assert await store.exists(path)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
async def test_bind_propagates_to_other_mount_namespace(store: NetnsStore):
    await store.create("first")  # makes the directory a shared mount point
    assert _is_shared_mount_point(store.directory)
    later = store.directory / "later"
    # A mount namespace copied from ours now (keeping propagation) must see a bind made
    # afterwards: without the shared directory it would see the plain empty file.
    proc = await asyncio.create_subprocess_exec(
        "unshare",
        "-m",
        "--propagation",
        "unchanged",
        "sh",
        "-c",
        f'echo ready; read go; stat -c %i "{later}"',
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert await proc.stdout.readline() == b"ready\n"
        path = await store.create("later")
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert int(out.strip()) == _ino(path)


async def test_run_in_netns_rejects_non_namespace(store: NetnsStore, tmp_path: Path):
    plain = tmp_path / "plain"
    await asyncio.to_thread(plain.touch)
    with pytest.raises(NotFound):
        await run_in_netns(plain, _interfaces)
    with pytest.raises(NotFound):
        await run_in_netns(tmp_path / "missing", _interfaces)


def test_creation_does_not_import_pyroute2(tmp_path: Path):
    code = (
        "import asyncio, sys\n"
        "from pycontainerd.network.netns import NetnsStore, unmount_netns_dir\n"
        f"s = NetnsStore({os.fspath(tmp_path / 'netns')!r})\n"
        "try:\n"
        "    asyncio.run(s.create('x'))\n"
        "finally:\n"
        "    unmount_netns_dir(s.directory)\n"
        "print('pyroute2' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert out.stdout.strip() == b"False"
