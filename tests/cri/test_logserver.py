"""The log writer fork server (``pycontainerd.cri.logserver``) as a real detached process:
writers it forks, rotation, concurrency, bad requests, version replacement, idle exit; and
(as root, with the CRI daemon) the daemon's use of it across a restart."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.cri import logserver
from tests.cri.helpers import (
    container_config,
    pod_config,
    remove_pod,
    run_pod,
    start_container,
    wait_log,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.cri.conftest import CRI
    from tests.support.daemon import Daemon


def _wait(cond: Callable[[], bool], within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before, or between open and read
        return True


def _records(path: Path) -> list[bytes]:
    """The log's records without their timestamps."""
    return [line.split(b" ", 1)[1] for line in path.read_bytes().splitlines()]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="pcdls-", dir="/tmp"))
    try:
        yield d
    finally:
        path = str(d / "s.sock")
        if os.path.exists(path):
            with contextlib.suppress(OSError):
                logserver.quit_server(path)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sock_dir: Path) -> str:
    path = str(sock_dir / "s.sock")
    logserver.start_server(path)
    return path


def test_server_writes_records(server: str, tmp_path: Path) -> None:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    log = tmp_path / "pod" / "c.log"
    try:
        pid = logserver.spawn(server, str(log), 8, [("stdout", out_r), ("stderr", err_r)])
    finally:
        os.close(out_r)
        os.close(err_r)
    assert pid != logserver.ping(server)["pid"]
    os.write(out_w, b"hello\n0123456789\nno newline")
    os.write(err_w, b"oops\n")
    os.close(out_w)
    os.close(err_w)
    assert _wait(lambda: _gone(pid)), "the writer did not exit at EOF"
    assert sorted(_records(log)) == sorted(
        [
            b"stdout F hello",
            b"stdout P 01234567",
            b"stdout F 89",
            b"stdout P no newli",
            b"stdout P ne",
            b"stderr F oops",
        ]
    )
    # Reaped by the server, not left a zombie.
    assert _wait(lambda: not os.path.exists(f"/proc/{pid}"))
    assert logserver.ping(server)["children"] == 0


def test_writer_sheds_server_fds(server: str, tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        pid = logserver.spawn(server, str(tmp_path / "c.log"), 100, [("stdout", r)])
    finally:
        os.close(r)
    try:
        assert _wait((tmp_path / "c.log").exists)
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [link for link in links if link.startswith("socket:")], links
        assert os.getsid(pid) == pid  # a session of its own, like a spawned writer
    finally:
        os.close(w)
    assert _wait(lambda: _gone(pid))


def test_sigusr1_reopens_after_rotation(server: str, tmp_path: Path) -> None:
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    log = tmp_path / "c.log"
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pid = logserver.spawn(server, str(log), 100, [("stdout", r)])
    finally:
        os.close(r)
    w = os.open(fifo, os.O_WRONLY)
    os.write(w, b"before\n")
    assert _wait(lambda: log.exists() and b"before" in log.read_bytes())
    rotated = tmp_path / "c.log.1"
    log.rename(rotated)
    os.kill(pid, signal.SIGUSR1)
    assert _wait(log.exists)
    os.write(w, b"after\n")
    os.close(w)
    assert _wait(lambda: _gone(pid))
    assert _records(rotated) == [b"stdout F before"]
    assert _records(log) == [b"stdout F after"]


def test_concurrent_requests(server: str, tmp_path: Path) -> None:
    pipes = [os.pipe() for _ in range(8)]

    def one(i: int) -> int:
        return logserver.spawn(server, str(tmp_path / f"{i}.log"), 100, [("stdout", pipes[i][0])])

    try:
        with ThreadPoolExecutor(len(pipes)) as pool:
            pids = list(pool.map(one, range(len(pipes))))
    finally:
        for r, _ in pipes:
            os.close(r)
    assert len(set(pids)) == len(pipes)
    for i, (_, w) in enumerate(pipes):
        os.write(w, f"line {i}\n".encode())
        os.close(w)
    for pid in pids:
        assert _wait(functools.partial(_gone, pid))
    for i in range(len(pipes)):
        assert _records(tmp_path / f"{i}.log") == [f"stdout F line {i}".encode()]


def _raw(path: str, data: bytes, fds: list[int]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(path)
        if fds:
            socket.send_fds(s, [data], fds)
        else:
            s.send(data)
        answer = json.loads(s.recv(65536))
    assert isinstance(answer, dict)
    return answer


def _spawn_req(**change: object) -> bytes:
    req = {"v": 1, "op": "spawn", "log_path": "/x.log", "max_line": 8, "streams": ["stdout"]}
    return json.dumps(req | change).encode()


@pytest.mark.parametrize(
    ("payload", "nfds", "error"),
    [
        (b"not json", 1, "bad request"),
        (b"[1, 2]", 0, "bad request"),
        (b'{"v": 1, "op": "dance"}', 0, "unknown op"),
        (_spawn_req(log_path="rel.log"), 1, "absolute"),
        (_spawn_req(max_line=0), 1, "max_line"),
        (_spawn_req(streams=["stdout", "stdout"]), 2, "streams"),
        (_spawn_req(streams=["stdout", "stdin"]), 2, "streams"),
        (_spawn_req(streams=["stdout", "stderr"]), 1, "fds attached"),
        (b'{"v": 99, "op": "spawn"}', 1, "protocol version 99"),
    ],
)
def test_bad_request_answered_and_server_serves_on(
    server: str, tmp_path: Path, payload: bytes, nfds: int, error: str
) -> None:
    pipes = [os.pipe() for _ in range(nfds)]
    try:
        answer = _raw(server, payload, [r for r, _ in pipes])
    finally:
        for r, _ in pipes:
            os.close(r)
    assert error in str(answer.get("error")), answer
    assert answer["v"] == logserver.PROTOCOL_VERSION
    # The server dropped its copies of the read ends: nobody reads these pipes any more.
    for _, w in pipes:
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
        os.close(w)
    r, w = os.pipe()
    try:
        pid = logserver.spawn(server, str(tmp_path / "ok.log"), 100, [("stdout", r)])
    finally:
        os.close(r)
    os.write(w, b"still here\n")
    os.close(w)
    assert _wait(lambda: _gone(pid))
    assert _records(tmp_path / "ok.log") == [b"stdout F still here"]


def test_spawn_writer_starts_then_reuses_server(sock_dir: Path, tmp_path: Path) -> None:
    path = str(sock_dir / "s.sock")
    with pytest.raises(FileNotFoundError):
        logserver.ping(path)
    pids = []
    for i in range(2):
        r, w = os.pipe()
        try:
            pids.append(
                logserver.spawn_writer(path, str(tmp_path / f"{i}.log"), 100, [("stdout", r)])
            )
        finally:
            os.close(r)
        if i == 0:
            first_server = logserver.ping(path)["pid"]
        os.write(w, b"x\n")
        os.close(w)
    assert logserver.ping(path)["pid"] == first_server
    for i, pid in enumerate(pids):
        assert _wait(functools.partial(_gone, pid))
        assert _records(tmp_path / f"{i}.log") == [b"stdout F x"]


def test_spawn_writer_replaces_server_of_other_version(sock_dir: Path, tmp_path: Path) -> None:
    path = str(sock_dir / "s.sock")
    old = (
        "import sys; from pycontainerd.cri import logserver as m; "
        "m.PROTOCOL_VERSION = 0; sys.exit(m.main([sys.argv[1]]))"
    )
    subprocess.run([sys.executable, "-c", old, path], check=True, timeout=30)
    with pytest.raises(logserver.VersionMismatch):
        logserver.ping(path)
    r, w = os.pipe()
    try:
        pid = logserver.spawn_writer(path, str(tmp_path / "c.log"), 100, [("stdout", r)])
    finally:
        os.close(r)
    assert logserver.ping(path)["v"] == logserver.PROTOCOL_VERSION
    os.write(w, b"new\n")
    os.close(w)
    assert _wait(lambda: _gone(pid))
    assert _records(tmp_path / "c.log") == [b"stdout F new"]


def test_idle_exit(sock_dir: Path, tmp_path: Path) -> None:
    path = str(sock_dir / "s.sock")
    logserver.start_server(path, idle_exit=1.0)
    r, w = os.pipe()
    try:
        writer = logserver.spawn(path, str(tmp_path / "c.log"), 100, [("stdout", r)])
    finally:
        os.close(r)
    server_pid = logserver.ping(path)["pid"]
    assert isinstance(server_pid, int)
    # A live writer keeps the server up well past its idle timeout.
    time.sleep(2.5)
    assert logserver.ping(path)["children"] == 1
    os.close(w)
    assert _wait(lambda: _gone(writer))
    assert _wait(lambda: _gone(server_pid)), "the idle server did not exit"
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        logserver.ping(path)


def test_server_exits_when_socket_removed(server: str, tmp_path: Path) -> None:
    server_pid = logserver.ping(server)["pid"]
    assert isinstance(server_pid, int)
    os.unlink(server)
    assert _wait(lambda: _gone(server_pid), within=30), "the orphaned server did not exit"


def test_logwriter_serve_entry_point(sock_dir: Path) -> None:
    path = str(sock_dir / "s.sock")
    subprocess.run(
        [sys.executable, "-m", "pycontainerd.cri.logwriter", "--serve", path],
        check=True,
        timeout=30,
    )
    assert logserver.ping(path)["children"] == 0
    assert os.stat(path).st_mode & 0o777 == 0o600


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def _writer_pid(cri: CRI, cid: str) -> int:
    resp = await cri.runtime.ContainerStatus(
        api_pb2.ContainerStatusRequest(container_id=cid, verbose=True)
    )
    pid = json.loads(resp.info["info"])["logWriterPid"]
    assert isinstance(pid, int)
    return pid


@pytest.mark.root
async def test_daemon_forks_writers_through_server(
    cri: CRI, cri_daemon: Daemon, tmp_path: Path
) -> None:
    sock = str(cri_daemon.state / "io.containerd.grpc.v1.cri" / "logsrv.sock")
    script = "echo {}; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
    pod_cfg = pod_config("logsrv", tmp_path)
    pod = await run_pod(cri, pod_cfg)
    try:
        first = await start_container(
            cri, pod, pod_cfg, container_config("one", ["sh", "-c", script.format("one")])
        )
        writer = await _writer_pid(cri, first)
        server_pid = (await asyncio.to_thread(logserver.ping, sock))["pid"]
        # Forked by the log server, not by the daemon.
        assert await asyncio.to_thread(_ppid, writer) == server_pid
        assert b"stdout F one" in await wait_log(tmp_path / "one.log", b"stdout F one")

        cri_daemon.kill9()
        cri_daemon.start()
        second = await start_container(
            cri, pod, pod_cfg, container_config("two", ["sh", "-c", script.format("two")])
        )
        # The restarted daemon reused the running server; the first writer lives on.
        assert await asyncio.to_thread(_ppid, await _writer_pid(cri, second)) == server_pid
        assert await asyncio.to_thread(_ppid, writer) == server_pid
        assert b"stdout F two" in await wait_log(tmp_path / "two.log", b"stdout F two")
        (tmp_path / "one.log").rename(tmp_path / "one.log.1")
        await cri.runtime.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=first))
        # As containerd's, the reopen answers once the new file exists.
        assert (tmp_path / "one.log").exists()
    finally:
        await remove_pod(cri, pod)
