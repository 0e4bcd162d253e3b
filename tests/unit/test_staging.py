"""The stager and its speculative unpacker process, without a daemon: a blob file
written in pieces is unpacked as it grows, handed over by digest, and moved into an
empty directory; a decompression bomb, a canceled write and a dead helper leave
nothing behind; blobs that arrive together share one helper; a job runs on idle CPU
only until someone waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from pycontainerd.transfer import unpacker
from pycontainerd.transfer.staging import Stager, looks_like_layer

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


@dataclass
class _Mount:
    type: str
    source: str
    options: tuple[str, ...] = ("rbind", "rw")


def _layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


async def _write_slowly(path: Path, blob: bytes, piece: int = 4096) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        for i in range(0, len(blob), piece):
            os.write(fd, blob[i : i + piece])
            await asyncio.sleep(0.001)
    finally:
        os.close(fd)


async def _eventually(check: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_unpacks_a_growing_file_and_moves_it_in(tmp_path: Path) -> None:
    stager = Stager(tmp_path / "staging")
    stager.clean()
    blob = _layer({"etc/hello": b"hello\n", "bin/tool": os.urandom(300_000)})
    data = tmp_path / "ingest-data"
    data.write_bytes(blob[:10])  # the first WRITE arrived
    spec = await stager.speculate(blob[:1024], data, len(blob))
    assert spec is not None
    await _write_slowly(data, blob)
    spec.finish("sha256:" + "ab" * 32, len(blob))
    target = tmp_path / "snapshot"
    target.mkdir()
    result = await stager.adopt("sha256:" + "ab" * 32, [_Mount("bind", str(target))])
    assert result is not None and result.size > 300_000
    assert (target / "etc/hello").read_bytes() == b"hello\n"
    assert list((tmp_path / "staging").iterdir()) == []
    await stager.close()


async def test_a_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    stager = Stager(tmp_path / "staging")
    stager.clean()
    stager.MIN_LIMIT = 1 << 20
    blob = _layer({"zeros": bytes(32 << 20)})  # 32 MiB of zeros: a few KiB of gzip
    assert len(blob) * stager.MAX_RATIO < 32 << 20
    data = tmp_path / "ingest-data"
    data.write_bytes(blob)
    spec = await stager.speculate(blob[:1024], data, len(blob))
    assert spec is not None
    spec.finish("sha256:" + "cd" * 32, len(blob))
    assert await stager.take("sha256:" + "cd" * 32) is None
    # The discard runs in a thread.
    assert await _eventually(lambda: list((tmp_path / "staging").iterdir()) == [])
    await stager.close()


async def test_cancel_and_a_dead_helper(tmp_path: Path) -> None:
    stager = Stager(tmp_path / "staging")
    stager.clean()
    blob = _layer({"f": b"x" * 1000})
    data = tmp_path / "ingest-data"
    data.write_bytes(blob[:100])
    spec = await stager.speculate(blob[:100], data, len(blob))
    assert spec is not None
    spec.cancel()  # a restart of the write
    assert await stager.take("sha256:" + "ef" * 32) is None
    helper = stager._helper
    assert helper is not None
    helper.proc.kill()
    helper.proc.wait()
    assert await _eventually(lambda: not helper.alive)  # it sees the socket close
    # A new helper takes over for the next blob.
    data.write_bytes(blob)
    spec = await stager.speculate(blob[:100], data, len(blob))
    assert spec is not None
    spec.finish("sha256:" + "12" * 32, len(blob))
    layer = await stager.take("sha256:" + "12" * 32)
    assert layer is not None and layer.result is not None
    assert stager._helper is not helper
    layer.discard()
    await stager.close()


def _job_policies(pid: int) -> list[int]:
    """Scheduling policies of the helper's job threads (every thread but its main one)."""
    policies = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) != pid:
            with contextlib.suppress(ProcessLookupError):  # a job just ended
                policies.append(os.sched_getscheduler(int(tid)))
    return policies


async def test_blobs_arriving_together_share_one_helper(tmp_path: Path) -> None:
    stager = Stager(tmp_path / "staging")
    stager.clean()
    blob = _layer({"f": b"x" * 1000})
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"ingest-{i}")
        paths[-1].write_bytes(blob)
    specs = await asyncio.gather(*(stager.speculate(blob[:100], p, len(blob)) for p in paths))
    assert all(spec is not None for spec in specs)
    assert len({spec._helper for spec in specs if spec is not None}) == 1
    for i, spec in enumerate(specs):
        assert spec is not None
        spec.finish(f"sha256:{i:064x}", len(blob))
    for i in range(3):
        layer = await stager.take(f"sha256:{i:064x}")
        assert layer is not None and layer.result is not None
        layer.discard()
    await stager.close()


@pytest.mark.root  # leaving SCHED_IDLE takes CAP_SYS_NICE (else the job gives up)
async def test_a_job_runs_idle_until_hurried(tmp_path: Path) -> None:
    """Unasked, a job's thread is in the SCHED_IDLE class; ``take`` (Diff.Apply waiting)
    moves it to SCHED_OTHER, and so does ``wanted`` (the daemon's own pull) from the
    start."""
    stager = Stager(tmp_path / "staging")
    stager.clean()
    blob = _layer({"f": os.urandom(200_000)})
    data = tmp_path / "ingest-data"
    data.write_bytes(blob[:1000])  # the job waits for more
    spec = await stager.speculate(blob[:1000], data, len(blob))
    assert spec is not None and stager._helper is not None
    pid = stager._helper.proc.pid
    assert await _eventually(lambda: _job_policies(pid) == [os.SCHED_IDLE])
    spec._hurry()  # what take() does first when the job is still running
    assert await _eventually(lambda: _job_policies(pid) == [os.SCHED_OTHER])
    data.write_bytes(blob)
    spec.finish("sha256:" + "34" * 32, len(blob))
    layer = await stager.take("sha256:" + "34" * 32)
    assert layer is not None and layer.result is not None
    layer.discard()

    wanted = tmp_path / "pulled-data"
    wanted.write_bytes(blob[:1000])
    spec = await stager.speculate(blob[:1000], wanted, len(blob), wanted=True)
    assert spec is not None
    assert await _eventually(lambda: _job_policies(pid) == [os.SCHED_OTHER])
    spec.cancel()
    await stager.close()


def test_end_arriving_while_the_reader_is_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's "end" can land between the unpacker's read at the end of the file and
    its look at the size: that is the end of the blob, not a short blob. The race is
    forced here by a pread that lets "end" in (it cost a layer its unpack in about one
    daemon pull in thirty)."""
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 400)
    fd = os.open(path, os.O_RDONLY)
    job = unpacker._Job(1, fd, tmp_path / "out", 0)
    try:
        assert job.read(1000) == b"x" * 400
        real_pread = os.pread

        def pread(fd: int, n: int, offset: int) -> bytes:
            data = real_pread(fd, n, offset)
            if not data:
                job.poke(size=400)  # "end" comes right now
            return data

        monkeypatch.setattr(os, "pread", pread)
        assert job.read(1000) == b""
    finally:
        os.close(fd)


def test_what_looks_like_a_layer() -> None:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        tf.addfile(tarfile.TarInfo("x"), io.BytesIO(b""))
    assert looks_like_layer(gzip.compress(b"x")) and looks_like_layer(tar.getvalue())
    assert looks_like_layer(bytes.fromhex("28b52ffd") + b"rest")
    assert not looks_like_layer(b'{"schemaVersion": 2}') and not looks_like_layer(b"")
