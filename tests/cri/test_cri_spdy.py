"""SPDY/3.1 for the CRI streaming server: the frame codec and connection on their own, then
the real ``kubectl`` (exec, exec -i, exec -it under a pty, port-forward) through a fake
apiserver that proxies to our streaming URLs the way kubelet does."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import termios
import zlib
from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.cri import spdy
from pycontainerd.cri.spdy import (
    FLAG_FIN,
    REFUSED_STREAM,
    Connection,
    Data,
    Framer,
    GoAway,
    Headers,
    Ping,
    RstStream,
    Settings,
    SynReply,
    SynStream,
    WindowUpdate,
)
from tests.cri.fake_apiserver import FakeAPIServer, Pod
from tests.cri.helpers import WAIT, container_config, pod_config, remove_pod, run_pod
from tests.cri.helpers import start_container as start

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from tests.cri.conftest import CRI

KUBECTL = shutil.which("kubectl")
# A kubectl log line: severity letter, MMDD, time, pid, file:line]
KLOG = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\] ")
LOOP = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
# The first frame kubectl 1.32 sent on an exec connection: SYN_STREAM 1, streamtype=error,
# its header block compressed with Go's zlib and the SPDY/3 dictionary.
KUBECTL_SYN_STREAM = bytes.fromhex(
    "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a"
    "6800000000ffff"
)


# ---------------------------------------------------------------------- codec


def test_dictionary_is_spdy3s() -> None:
    # Draft 3 §2.6.10.1: 1423 bytes; zlib names a preset dictionary by its Adler-32, and
    # kubectl's frame above carries that checksum (78 f9 e3c6a7c2).
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")
    frame = Framer().decode(KUBECTL_SYN_STREAM[:8], KUBECTL_SYN_STREAM[8:])
    assert frame == SynStream(1, {"streamtype": "error"})


def test_frames_round_trip() -> None:
    client, server = Framer(), Framer()
    frames: list[spdy.Frame] = [
        SynStream(1, {"streamtype": "stdin", "port": "80"}, FLAG_FIN, associated_id=0, priority=3),
        # A second header block continues the same zlib stream.
        SynStream(3, {"streamtype": "stdout", "multi": "a\0b"}),
        SynReply(1, {}, FLAG_FIN),
        Headers(3, {"x": "y"}),
        RstStream(5, REFUSED_STREAM),
        Settings(((0, 7, 65536), (1, 4, 100))),
        Ping(7),
        GoAway(9, 1),
        WindowUpdate(0, 1 << 20),
        Data(1, b"payload", FLAG_FIN),
        Data(3, b""),
    ]
    for frame in frames:
        wire = client.encode(frame)
        assert server.decode(wire[:8], wire[8:]) == frame
    wire = client.encode(Ping(1))
    assert wire == bytes.fromhex("8003000600000004 00000001".replace(" ", ""))
    assert client.encode(Data(5, b"ab", FLAG_FIN)) == bytes.fromhex("00000005010000026162")
    # Unknown control types are skipped; a truncated one is a protocol error.
    assert server.decode(bytes.fromhex("800300ff00000000"), b"") is None
    with pytest.raises(spdy.SPDYError):
        server.decode(bytes.fromhex("8003000300000004"), b"\0\0\0\1")


# ---------------------------------------------------------------------- connection


class RawClient:
    """A SPDY client built from the codec alone, over a real socket."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w, self.framer = r, w, Framer()

    async def send(self, frame: spdy.Frame) -> None:
        self.w.write(self.framer.encode(frame))
        await self.w.drain()

    async def recv(self) -> spdy.Frame | None:
        try:
            async with asyncio.timeout(WAIT):
                return await self.framer.read(self.r)
        except asyncio.IncompleteReadError:
            return None


@pytest.fixture
async def spdy_pair() -> AsyncIterator[tuple[Connection, RawClient]]:
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    def refuse_odd(headers: dict[str, str]) -> str | None:
        return "refused" if headers.get("streamtype") == "bogus" else None

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.put_nowait(Connection(r, w, refuse_odd))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    conn = await accepted.get()
    yield conn, RawClient(r, w)
    await conn.close(grace=0)
    w.close()
    server.close()


async def test_connection_streams(spdy_pair: tuple[Connection, RawClient]) -> None:
    conn, client = spdy_pair
    await client.send(SynStream(1, {"streamtype": "stdin"}))
    assert await client.recv() == SynReply(1, {})
    stream = await conn.accept()
    assert stream is not None and stream.id == 1 and stream.header("streamtype") == "stdin"
    await client.send(Ping(1))
    assert await client.recv() == Ping(1)
    # Refused by the validator; an even (server-side) id is a protocol error.
    await client.send(SynStream(3, {"streamtype": "bogus"}))
    assert await client.recv() == RstStream(3, REFUSED_STREAM)
    await client.send(SynStream(6, {}))
    assert await client.recv() == RstStream(6, spdy.PROTOCOL_ERROR)

    # 4 MiB each way with no WINDOW_UPDATE from the client (spdystream sends none): the
    # server must not wait for window, and grants window for what it consumed.
    blob = os.urandom(4 << 20)

    async def upload() -> None:
        for i in range(0, len(blob), 1 << 15):
            await client.send(Data(1, blob[i : i + (1 << 15)]))
        await client.send(Data(1, b"", FLAG_FIN))

    async def echo() -> bytes:
        got = b""
        while chunk := await stream.read():
            got += chunk
        await stream.write(got, fin=True)
        return got

    up, echoed = asyncio.create_task(upload()), asyncio.create_task(echo())
    back, updates = b"", 0
    while True:
        frame = await client.recv()
        if isinstance(frame, WindowUpdate):
            updates += frame.delta if frame.stream_id == 0 else 0
        elif isinstance(frame, Data):
            back += frame.data
            if frame.flags & FLAG_FIN:
                break
        else:
            raise AssertionError(f"unexpected {frame}")
    await up
    assert await echoed == blob and back == blob
    assert updates == len(blob) // (32 << 10) * (32 << 10)

    # Close: our open streams get FIN, then GOAWAY naming the last stream seen.
    await client.send(SynStream(5, {"streamtype": "stdout"}))
    assert await client.recv() == SynReply(5, {})
    assert (await conn.accept()) is not None
    closer = asyncio.create_task(conn.close())
    assert await client.recv() == Data(5, b"", FLAG_FIN)
    assert await client.recv() == GoAway(5, 0)
    client.w.close()
    await closer
    assert await conn.accept() is None


async def test_connection_reset_and_goaway(spdy_pair: tuple[Connection, RawClient]) -> None:
    conn, client = spdy_pair
    await client.send(SynStream(1, {"streamtype": "data"}))
    assert await client.recv() == SynReply(1, {})
    stream = await conn.accept()
    assert stream is not None
    await client.send(Data(1, b"before reset"))
    await client.send(RstStream(1, spdy.CANCEL))
    assert await stream.read() == b"before reset"
    assert await stream.read() == b""
    with pytest.raises(ConnectionResetError):
        await stream.write(b"late")
    await client.send(GoAway(1, 0))
    assert await conn.accept() is None
    # Garbage ends the connection with a protocol-error GOAWAY.
    await client.send(Data(1, b"x"))  # for a stream gone: ignored
    client.w.write(bytes.fromhex("8003000300000002") + b"\0\0")
    assert await client.recv() == GoAway(1, spdy.PROTOCOL_ERROR)
    await asyncio.wait_for(conn.done.wait(), WAIT)


# ---------------------------------------------------------------------- kubectl


async def _poll(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


def _kubectl_minor() -> int:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "version", "--client", "-o", "json"], capture_output=True, check=True
    ).stdout
    return int(re.sub(r"\D", "", json.loads(out)["clientVersion"]["minor"]))


needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="needs kubectl (apt install kubernetes-client)"
)


class Kube:
    def __init__(self, cri: CRI, api: FakeAPIServer, tmp_path: Path) -> None:
        self.cri, self.api, self.tmp_path = cri, api, tmp_path
        self.kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        self.pods: list[str] = []

    async def pod(self, name: str, script: str) -> str:
        cfg = pod_config(name, self.tmp_path)
        sandbox = await run_pod(self.cri, cfg)
        self.pods.append(sandbox)
        cid = await start(self.cri, sandbox, cfg, container_config("c", ["sh", "-c", script]))
        self.api.pods[name] = Pod(sandbox, {"c": cid})
        return cid

    def env(self, websockets: bool = False) -> dict[str, str]:
        flag = "true" if websockets else "false"
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.tmp_path),  # kubectl's discovery cache goes there
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": flag,
            "KUBECTL_PORT_FORWARD_WEBSOCKETS": flag,
        }

    async def run(
        self, *args: str, stdin: bytes | None = None, websockets: bool = False
    ) -> tuple[int, bytes, bytes]:
        assert KUBECTL is not None
        proc = await asyncio.create_subprocess_exec(
            KUBECTL, *args, env=self.env(websockets),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(WAIT):
                out, err = await proc.communicate(stdin)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        # Without kubectl's own log lines: it may log, for one, that our "streams are up"
        # message (kubelet sends it too) came before it had set that stream up.
        err = b"".join(line for line in err.splitlines(keepends=True) if not KLOG.match(line))
        return proc.returncode, out, err


@pytest.fixture
async def kube(cri: CRI, tmp_path: Path) -> AsyncIterator[Kube]:
    api = FakeAPIServer(cri)
    await api.start()
    k = Kube(cri, api, tmp_path)
    try:
        yield k
    finally:
        await api.close()
        for sandbox in k.pods:
            await remove_pod(cri, sandbox)


@pytest.mark.root
@needs_kubectl
async def test_kubectl_exec(kube: Kube) -> None:
    await kube.pod("exec", LOOP)
    rc, out, err = await kube.run(
        "exec", "exec", "--", "sh", "-c", "echo out; echo err >&2; exit 3"
    )
    assert (rc, out) == (3, b"out\n"), err
    assert err.startswith(b"err\n") and b"exit code 3" in err
    # The handshake went to the SPDY path of a real upgrade request.
    assert any(
        r.startswith("POST /api/v1/namespaces/default/pods/exec/exec?") for r in kube.api.requests
    )

    data = os.urandom(300_000).hex().encode()  # stdin, ended by the stream's FIN
    rc, out, err = await kube.run(
        "exec", "-i", "exec", "--", "sh", "-c", "wc -c; echo done >&2", stdin=data
    )
    assert (rc, out.split(), err) == (0, [str(len(data)).encode()], b"done\n")


@pytest.mark.root
@needs_kubectl
async def test_kubectl_exec_tty_resize(kube: Kube) -> None:
    assert KUBECTL is not None
    await kube.pod("tty", LOOP)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 45, 123, 0, 0))
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, "exec", "-it", "tty", "--", "sh", "-c", "while read x; do stty size; done",
        stdin=slave, stdout=slave, stderr=slave, env=kube.env(), start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    os.set_blocking(master, False)
    loop = asyncio.get_running_loop()
    seen = bytearray()
    more = asyncio.Event()

    def readable() -> None:
        with contextlib.suppress(BlockingIOError):
            try:
                seen.extend(os.read(master, 65536))
            except OSError:  # EIO: kubectl has gone
                loop.remove_reader(master)
        more.set()

    async def until(needle: bytes, poke: bytes) -> None:
        # Keep entering lines until the shell prints the size we expect: the resize
        # travels on its own stream, so it may land after a line.
        async with asyncio.timeout(WAIT):
            while needle not in seen:
                os.write(master, poke)
                more.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(more.wait(), 0.5)

    loop.add_reader(master, readable)
    try:
        await until(b"45 123", b"a\r")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 100, 0, 0))
        proc.send_signal(signal.SIGWINCH)
        await until(b"50 100", b"b\r")
        os.write(master, b"\x04")  # ^D: the remote shell's read hits EOF
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0, seen
    finally:
        loop.remove_reader(master)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)


@pytest.mark.root
@needs_kubectl
async def test_kubectl_port_forward_10mb(kube: Kube) -> None:
    assert KUBECTL is not None
    # nc's stdin is a FIFO held open and never written: with an empty stdin busybox nc
    # shuts its sending side at once, and kubectl ends a forwarded connection as soon as
    # the pod side finished sending (it resets the stream), cutting the upload short.
    script = (
        "mkdir -p /www; dd if=/dev/urandom of=/www/big bs=1048576 count=10 2>/dev/null; "
        "busybox mkfifo /tmp/in; sleep 100000 > /tmp/in & "
        "{ nc -l -p 9000 < /tmp/in > /tmp/up; touch /tmp/up.done; } & "
        "exec httpd -f -p 8080 -h /www"
    )
    cid = await kube.pod("pf", script)
    # kubectl gives up the whole session when a forwarded connection fails (it reads the
    # error stream, then closes): wait until both servers listen.
    listening = api_pb2.ExecSyncRequest(container_id=cid, cmd=["busybox", "netstat", "-ltn"])

    async def both_listen() -> bool:
        out = (await kube.cri.runtime.ExecSync(listening)).stdout.replace(b"\n", b" ")
        return re.search(rb":8080 .*:9000 |:9000 .*:8080 ", out) is not None

    await _poll(both_listen)
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, "port-forward", "pf", "0:8080", "0:9000", env=kube.env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        local: dict[int, int] = {}
        async with asyncio.timeout(WAIT):
            while len(local) < 2:
                line = await proc.stdout.readline()
                assert line, (await proc.stderr.read()) if proc.stderr else b""
                if m := re.match(rb"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line):
                    local[int(m[2])] = int(m[1])

        async def sha256_in_pod(path: str) -> str:
            req = api_pb2.ExecSyncRequest(container_id=cid, cmd=["busybox", "sha256sum", path])
            resp = await kube.cri.runtime.ExecSync(req)
            return resp.stdout.split()[0].decode()

        r, w = await asyncio.open_connection("127.0.0.1", local[8080])
        w.write(b"GET /big HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(WAIT):
            body = await r.read()
        w.close()
        assert re.match(rb"HTTP/1\.[01] 200 ", body), body[:200]
        content = body.split(b"\r\n\r\n", 1)[1]
        assert len(content) == 10 << 20
        assert hashlib.sha256(content).hexdigest() == await sha256_in_pod("/www/big")

        blob = os.urandom(10 << 20)
        r, w = await asyncio.open_connection("127.0.0.1", local[9000])
        w.write(blob)
        await w.drain()
        w.write_eof()
        async with asyncio.timeout(WAIT):
            assert await r.read() == b""  # nc exited: the pod side closed
        w.close()
        done = api_pb2.ExecSyncRequest(container_id=cid, cmd=["test", "-e", "/tmp/up.done"])

        async def nc_done() -> bool:
            return (await kube.cri.runtime.ExecSync(done)).exit_code == 0

        await _poll(nc_done)
        assert await sha256_in_pod("/tmp/up") == hashlib.sha256(blob).hexdigest()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(WAIT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.root
@needs_kubectl
async def test_kubectl_bad_token(kube: Kube) -> None:
    await kube.pod("badtoken", LOOP)
    kube.api.tamper_token = True
    rc, out, err = await kube.run("exec", "badtoken", "--", "true")
    assert rc != 0 and out == b""
    assert b"unknown or expired token" in err, err


@pytest.mark.root
@needs_kubectl
async def test_kubectl_exec_over_websocket(kube: Kube) -> None:
    if _kubectl_minor() < 30:
        pytest.skip("this kubectl speaks only SPDY (WebSocket exec came in 1.30)")
    await kube.pod("ws", LOOP)
    rc, out, err = await kube.run(
        "exec", "-i", "ws", "--", "sh", "-c", "cat; echo err >&2; exit 4",
        stdin=b"through v5\n", websockets=True,
    )  # fmt: skip
    assert (rc, out) == (4, b"through v5\n"), err
    assert err.startswith(b"err\n"), err
    assert any(
        r.startswith("GET /api/v1/namespaces/default/pods/ws/exec?") for r in kube.api.requests
    )


@pytest.mark.root
@needs_kubectl
async def test_kubectl_attach(kube: Kube) -> None:
    assert KUBECTL is not None
    cid = await kube.pod("attach", "trap 'exit 0' TERM; while :; do echo tick; sleep 0.2; done")
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, "attach", "attach", "-c", "c", env=kube.env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            assert await proc.stdout.readline() == b"tick\n"
        # The container ending ends the attach session with a success status.
        await kube.cri.runtime.StopContainer(
            api_pb2.StopContainerRequest(container_id=cid, timeout=5)
        )
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
