"""The CRI streaming server: Exec, Attach and PortForward URLs opened with a WebSocket client
written here (independent of the server's framing code), against the real daemon, runc and
CNI, speaking the channel protocols kubectl uses."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from tests.cri.helpers import WAIT, container_config, pod_config, remove_pod, run_pod
from tests.cri.helpers import start_container as start

if TYPE_CHECKING:
    from pathlib import Path

    from tests.cri.conftest import CRI

pytestmark = [pytest.mark.root]

LOOP = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WSClient:
    """A minimal RFC 6455 client: masked frames out, messages in."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, proto: str) -> None:
        self.r, self.w, self.protocol = r, w, proto

    @classmethod
    async def connect(
        cls, url: str, protocols: str = "v5.channel.k8s.io, v4.channel.k8s.io", query: str = ""
    ) -> WSClient:
        u = urlsplit(url)
        r, w = await asyncio.open_connection(u.hostname, u.port)
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET {u.path}{query} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"
        )
        w.write(head.encode())
        resp = (await r.readuntil(b"\r\n\r\n")).decode()
        if not resp.startswith("HTTP/1.1 101"):
            w.close()
            raise ConnectionRefusedError(resp.split("\r\n")[0])
        hdrs = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in resp.split("\r\n")[1:] if line)
        }
        expect = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        assert hdrs["sec-websocket-accept"] == expect
        return cls(r, w, hdrs.get("sec-websocket-protocol", ""))

    async def send(self, channel: int, data: bytes) -> None:
        payload = bytes([channel]) + data
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x82])
        if n < 126:
            head += bytes([0x80 | n])
        else:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.w.write(head + mask + masked)
        await self.w.drain()

    async def recv(self) -> tuple[int, bytes] | None:
        """(channel, data) of the next message; None once the server closed."""
        try:
            b0, b1 = await self.r.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.r.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.r.readexactly(8))
            assert not b1 & 0x80, "server frames must not be masked"
            data = await self.r.readexactly(n)
        except asyncio.IncompleteReadError:
            return None
        if b0 & 0x0F == 0x8:
            return None
        assert b0 & 0x0F == 0x2, f"unexpected opcode {b0 & 0x0F}"
        return data[0], data[1:]

    async def collect(self) -> dict[int, bytes]:
        """Everything per channel until the server closes."""
        out: dict[int, bytes] = {}
        async with asyncio.timeout(WAIT):
            while (msg := await self.recv()) is not None:
                out[msg[0]] = out.get(msg[0], b"") + msg[1]
        self.w.close()
        return out


async def _pod_with(cri: CRI, tmp_path: Path, name: str, script: str) -> tuple[str, str]:
    pod_cfg = pod_config(name, tmp_path)
    pod = await run_pod(cri, pod_cfg)
    cid = await start(cri, pod, pod_cfg, container_config("c", ["sh", "-c", script]))
    return pod, cid


async def _exec_url(cri: CRI, cid: str, cmd: list[str], **kw: Any) -> str:
    req = api_pb2.ExecRequest(container_id=cid, cmd=cmd, **kw)
    return (await cri.runtime.Exec(req)).url


async def test_exec_streams_exit_code_and_stdin(cri: CRI, tmp_path: Path) -> None:
    pod, cid = await _pod_with(cri, tmp_path, "exec", LOOP)
    try:
        url = await _exec_url(
            cri, cid, ["sh", "-c", "echo out; echo err >&2; exit 3"], stdout=True, stderr=True
        )
        assert url.startswith("http://127.0.0.1:")
        ws = await WSClient.connect(url)
        assert ws.protocol == "v5.channel.k8s.io"
        got = await ws.collect()
        assert (got.get(1), got.get(2)) == (b"out\n", b"err\n")
        status = json.loads(got[3])
        assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
        # The token was single use.
        with pytest.raises(ConnectionRefusedError, match="404"):
            await WSClient.connect(url)

        ws = await WSClient.connect(
            await _exec_url(cri, cid, ["echo", "v4"], stdout=True), "v4.channel.k8s.io"
        )
        assert ws.protocol == "v4.channel.k8s.io"
        got = await ws.collect()
        assert got.get(1) == b"v4\n" and json.loads(got[3])["status"] == "Success", got

        # stdin, ended by v5's close signal for channel 0.
        ws = await WSClient.connect(
            await _exec_url(cri, cid, ["cat"], stdin=True, stdout=True, stderr=True)
        )
        await ws.send(0, b"hello stdin\n")
        await ws.send(255, b"\x00")
        got = await ws.collect()
        assert got.get(1) == b"hello stdin\n"
        assert json.loads(got[3]) == {"metadata": {}, "status": "Success"}
    finally:
        await remove_pod(cri, pod)


async def test_exec_tty_resize(cri: CRI, tmp_path: Path) -> None:
    pod, cid = await _pod_with(cri, tmp_path, "tty", LOOP)
    try:
        url = await _exec_url(
            cri, cid, ["sh", "-c", "read x; stty size"], tty=True, stdin=True, stdout=True
        )
        ws = await WSClient.connect(url)
        await ws.send(4, json.dumps({"Width": 123, "Height": 45}).encode())
        await ws.send(0, b"go\r")
        got = await ws.collect()
        assert b"45 123" in got.get(1, b""), got
        assert 2 not in got  # a terminal has no separate stderr
        assert json.loads(got[3])["status"] == "Success"
    finally:
        await remove_pod(cri, pod)


async def test_attach_follows_output(cri: CRI, tmp_path: Path) -> None:
    pod, cid = await _pod_with(
        cri, tmp_path, "attach", "trap 'exit 0' TERM; while :; do echo tick; sleep 0.2; done"
    )
    try:
        url = (
            await cri.runtime.Attach(
                api_pb2.AttachRequest(container_id=cid, stdout=True, stderr=True)
            )
        ).url
        ws = await WSClient.connect(url)
        seen = b""
        async with asyncio.timeout(WAIT):
            while b"tick\ntick\n" not in seen:
                msg = await ws.recv()
                assert msg is not None
                if msg[0] == 1:
                    seen += msg[1]
        await cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=5))
        rest = await ws.collect()
        assert json.loads(rest[3]) == {"metadata": {}, "status": "Success"}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cri.runtime.Attach(api_pb2.AttachRequest(container_id=cid, stdout=True))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await remove_pod(cri, pod)


async def test_port_forward_to_httpd(cri: CRI, tmp_path: Path) -> None:
    script = "mkdir -p /www && echo hello-pf > /www/index.html && exec httpd -f -p 8080 -h /www"
    pod, _ = await _pod_with(cri, tmp_path, "pf", script)
    try:
        body = b""
        async with asyncio.timeout(WAIT):
            while b"hello-pf" not in body:
                req = api_pb2.PortForwardRequest(pod_sandbox_id=pod, port=[8080])
                url = (await cri.runtime.PortForward(req)).url
                ws = await WSClient.connect(url, "v4.channel.k8s.io", query="?port=8080")
                await ws.send(0, b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
                got = await ws.collect()
                # Each channel starts with the port, little endian.
                assert got[0][:2] == got[1][:2] == struct.pack("<H", 8080)
                body = got[0][2:]
                if b"hello-pf" not in body:
                    assert b"connect" in got[1], got  # httpd not listening yet
                    await asyncio.sleep(0.2)
        assert body.startswith(b"HTTP/1.")
    finally:
        await remove_pod(cri, pod)


async def test_bad_requests(cri: CRI, tmp_path: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.Exec(api_pb2.ExecRequest(container_id="0" * 64, cmd=["true"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    pod, cid = await _pod_with(cri, tmp_path, "badreq", LOOP)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cri.runtime.Exec(api_pb2.ExecRequest(container_id=cid, stdout=True))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        url = await _exec_url(cri, cid, ["true"], stdout=True)
        with pytest.raises(ConnectionRefusedError, match="400"):
            await WSClient.connect(url, "channel.k8s.io")
        # A refused upgrade still used the token up.
        with pytest.raises(ConnectionRefusedError, match="404"):
            await WSClient.connect(url)
        u = urlsplit(url)
        with pytest.raises(ConnectionRefusedError, match="404"):
            await WSClient.connect(f"http://{u.netloc}/exec/not-a-token")
    finally:
        await remove_pod(cri, pod)
