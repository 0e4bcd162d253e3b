"""Our HTTP/2 gRPC server against grpcio's client: every call shape, status, limit and
cancellation path, over a real unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest

from pycontainerd.errdefs import NotFound
from pycontainerd.grpc.interceptors import wrap_handler
from pycontainerd.grpc.transport import Server
from pycontainerd.namespaces import current_namespace

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


def _channel(addr: str, **kw: Any) -> Any:
    # Raw-bytes calls (no serializers): the stubs' generics cannot describe them.
    return grpc.aio.insecure_channel(addr, **kw)


def _sync_channel(addr: str) -> Any:
    return grpc.insecure_channel(addr, compression=grpc.Compression.Gzip)


class Echo:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.finally_ran = asyncio.Event()
        self.gate = asyncio.Event()
        self.entered = 0
        self.both_in = asyncio.Event()  # a "gate" and a "sleep" call are running

    def _enter(self) -> None:
        self.entered += 1
        if self.entered == 2:
            self.both_in.set()

    async def unary(self, request: bytes, context: Any) -> bytes:
        if request == b"notfound":
            raise NotFound("thing 'x'")
        if request == b"boom":
            raise RuntimeError("kaput")
        if request == b"abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "nope, ünïcode % here")
        if request == b"ns":
            return (current_namespace.get() or "").encode()
        if request == b"md":
            md = dict(context.invocation_metadata())
            return md["x-bin"] if isinstance(md.get("x-bin"), bytes) else b"missing"
        if request == b"big":
            return b"x" * (17 << 20)
        if request == b"gate":
            self._enter()
            await self.gate.wait()
            return b"done"
        if request == b"sleep":
            self._enter()
            try:
                await asyncio.sleep(30)
            finally:
                self.finally_ran.set()
        return request[::-1]

    async def server_stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        n = int(request)
        try:
            for i in range(n):
                yield i.to_bytes(4, "big") * 256
            if n == 0:
                await asyncio.sleep(30)
        finally:
            self.finally_ran.set()

    async def client_stream(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        total = 0
        async for r in requests:
            total += len(r)
        return str(total).encode()

    async def bidi(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r.upper()


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, Echo]]:
    d = tempfile.mkdtemp(prefix="pcdt-", dir="/tmp")
    path = os.path.join(d, "s.sock")
    echo = Echo()
    server = Server(wrap=wrap_handler)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(echo.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    server.add_insecure_port("unix:" + path)
    await server.start()
    yield "unix:" + path, echo
    await server.stop(0)
    os.unlink(path)
    os.rmdir(d)


async def test_unary_and_errors(echo_server: tuple[str, Echo]) -> None:
    addr, _ = echo_server
    async with _channel(addr) as ch:
        call = ch.unary_unary("/test.Echo/Unary")
        assert await call(b"abc") == b"cba"
        assert await call(b"") == b""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"notfound")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "thing 'x': not found"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"boom")
        assert info.value.code() == grpc.StatusCode.UNKNOWN
        assert "kaput" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"abort")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.value.details() == "nope, ünïcode % here"
        assert await call(b"ns", metadata=(("containerd-namespace", "abc"),)) == b"abc"
        assert await call(b"md", metadata=(("x-bin", b"\x00\xff\x01"),)) == b"\x00\xff\x01"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/test.Echo/Nope")(b"")
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_message_limits(echo_server: tuple[str, Echo]) -> None:
    addr, _ = echo_server
    opts = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    async with _channel(addr, options=opts) as ch:
        call = ch.unary_unary("/test.Echo/Unary")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"y" * (17 << 20))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"big")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The connection keeps working.
        assert await call(b"ok") == b"ko"
        big = os.urandom(15 << 20)
        assert await call(big) == big[::-1]


async def test_streams(echo_server: tuple[str, Echo]) -> None:
    addr, _ = echo_server
    async with _channel(addr) as ch:
        got = [m async for m in ch.unary_stream("/test.Echo/ServerStream")(b"5000")]
        assert len(got) == 5000
        assert got[4999] == (4999).to_bytes(4, "big") * 256

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(300):
                yield b"z" * (1 << 20)

        assert await ch.stream_unary("/test.Echo/ClientStream")(chunks()) == str(300 << 20).encode()
        call = ch.stream_stream("/test.Echo/Bidi")()
        for word in (b"a", b"bc", b"def"):
            await call.write(word)
            assert await call.read() == word.upper()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF


async def test_slow_reader_gets_everything_in_order(echo_server: tuple[str, Echo]) -> None:
    addr, _ = echo_server
    async with _channel(addr) as ch:
        n = 20000  # ~20 MB: far beyond every flow-control window
        i = 0
        async for m in ch.unary_stream("/test.Echo/ServerStream")(str(n).encode()):
            assert m[:4] == i.to_bytes(4, "big")
            i += 1
            if i % 2000 == 0:
                await asyncio.sleep(0.05)
        assert i == n


async def test_deadline_and_cancel(echo_server: tuple[str, Echo]) -> None:
    addr, echo = echo_server
    async with _channel(addr) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/test.Echo/Unary")(b"sleep", timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(echo.finally_ran.wait(), 5)
        echo.finally_ran.clear()
        call = ch.unary_stream("/test.Echo/ServerStream")(b"0")
        await asyncio.sleep(0.2)
        call.cancel()
        # The handler's cleanup runs when the client goes away.
        await asyncio.wait_for(echo.finally_ran.wait(), 5)


def test_sync_client_and_compression(echo_server: tuple[str, Echo]) -> None:
    addr, _ = echo_server

    def run() -> None:
        with _sync_channel(addr) as ch:
            assert ch.unary_unary("/test.Echo/Unary")(b"x" * 1000) == b"x" * 1000

    loop = asyncio.get_event_loop()
    # The server runs on this loop: drive the blocking client from a thread.
    loop.run_until_complete(asyncio.to_thread(run))


async def test_many_concurrent_unary_calls_on_one_connection(echo_server: tuple[str, Echo]) -> None:
    addr, _ = echo_server
    async with _channel(addr) as ch:
        call = ch.unary_unary("/test.Echo/Unary")
        payloads = [os.urandom(i % 300) + str(i).encode() for i in range(3000)]
        results = await asyncio.gather(*(call(p) for p in payloads))
        assert results == [p[::-1] for p in payloads]


async def test_flow_control_both_ways_with_slow_peer(echo_server: tuple[str, Echo]) -> None:
    addr, _ = echo_server
    async with _channel(addr) as ch:
        call = ch.stream_stream("/test.Echo/Bidi")()
        chunks = [bytes([97 + i % 26]) * (1 << 20) for i in range(48)]

        async def send() -> None:
            for c in chunks:
                await call.write(c)
            await call.done_writing()

        writer = asyncio.create_task(send())
        got = []
        while (m := await call.read()) != grpc.aio.EOF:
            got.append(m)
            if len(got) % 8 == 0:
                await asyncio.sleep(0.1)  # the reader lags: the server must wait for credit
        await writer
        assert got == [c.upper() for c in chunks]


async def test_client_pings_and_window_updates_mid_call(echo_server: tuple[str, Echo]) -> None:
    addr, _ = echo_server
    # Keepalive pings and BDP probes (PING + SETTINGS/WINDOW_UPDATE growth) while streaming.
    opts = [
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.bdp_probe", 1),
    ]
    async with _channel(addr, options=opts) as ch:
        n = 0
        async for m in ch.unary_stream("/test.Echo/ServerStream")(b"6000"):
            assert m[:4] == n.to_bytes(4, "big")
            n += 1
            if n % 1000 == 0:
                await asyncio.sleep(0.15)
        assert n == 6000
        assert await ch.unary_unary("/test.Echo/Unary")(b"after") == b"retfa"


async def test_garbage_peer_is_dropped_and_others_keep_working(
    echo_server: tuple[str, Echo],
) -> None:
    addr, _ = echo_server
    async with _channel(addr) as ch:
        call = ch.unary_unary("/test.Echo/Unary")
        assert await call(b"before") == b"erofeb"
        reader, writer = await asyncio.open_unix_connection(addr[len("unix:") :])
        writer.write(os.urandom(4096))
        # The server answers with its SETTINGS, maybe a GOAWAY, then closes the connection.
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest[3] == 4  # the first frame is SETTINGS
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        assert await call(b"after") == b"retfa"


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


async def test_tls_with_alpn_h2(tls_files: tuple[Path, Path]) -> None:
    key, cert = tls_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = Server(wrap=wrap_handler)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Unary": grpc.unary_unary_rpc_method_handler(Echo().unary)
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server.add_secure_port(f"127.0.0.1:{port}", ctx)
    await server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        opts = [("grpc.ssl_target_name_override", "localhost")]
        channel: Any = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts)
        async with channel as ch:
            assert await ch.unary_unary("/test.Echo/Unary")(b"tls") == b"slt"
    finally:
        await server.stop(0)


async def test_stop_lets_calls_finish_within_grace_and_drops_the_rest() -> None:
    d = tempfile.mkdtemp(prefix="pcdt-", dir="/tmp")
    path = os.path.join(d, "s.sock")
    echo = Echo()
    server = Server(wrap=wrap_handler)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary)
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    server.add_insecure_port("unix:" + path)
    await server.start()
    try:
        async with _channel("unix:" + path) as ch:
            call = ch.unary_unary("/test.Echo/Unary")
            gated = asyncio.ensure_future(call(b"gate"))
            stuck = asyncio.ensure_future(call(b"sleep"))
            await asyncio.wait_for(echo.both_in.wait(), 10)
            stopping = asyncio.ensure_future(server.stop(1.0))
            await asyncio.sleep(0)  # stop() has sent its GOAWAY and waits for the calls
            echo.gate.set()
            assert await gated == b"done"  # finished within the grace period
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stuck
            # Cut off with its connection, as Go gRPC's Server.Stop does.
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await stopping
            await asyncio.wait_for(echo.finally_ran.wait(), 5)
    finally:
        await server.stop(0)
        os.unlink(path)
        os.rmdir(d)
