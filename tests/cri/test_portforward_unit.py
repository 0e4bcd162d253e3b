"""``forward_port`` without a pod: a server on the host's loopback (an empty netns means
the host network) and a pipe standing in for the client side."""

from __future__ import annotations

import asyncio

from pycontainerd.cri.portforward import HALF_CLOSE_GRACE, forward_port
from pycontainerd.cri.runtime import Sandbox
from pycontainerd.cri.store import SandboxMeta

WAIT = 10.0


class SilentClient:
    """Like kubectl before 1.30: it never ends its own side of a forwarded connection
    until the error stream closes, which only happens once forward_port returns."""

    half_close = True

    def __init__(self) -> None:
        self.received = bytearray()
        self.write_closed = False
        self._never = asyncio.Event()

    async def read(self) -> bytes:
        await self._never.wait()
        return b""

    async def write(self, data: bytes) -> None:
        self.received += data

    async def fail(self, message: str) -> None:
        raise AssertionError(message)

    async def close_write(self) -> None:
        self.write_closed = True


async def test_pod_side_end_closes_the_pair_after_a_grace() -> None:
    """The pod's server sends its answer and closes: forwarding must end (so the streams
    close) even though the client never half-closes, after at most the grace period."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"x" * 100_000)
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = SilentClient()
    sb = Sandbox(SandboxMeta(id="pf", name="pf", config=b"", created_at=0))
    try:
        async with asyncio.timeout(WAIT + HALF_CLOSE_GRACE):
            await forward_port(sb, port, client)
    finally:
        server.close()
    assert client.write_closed
    assert bytes(client.received) == b"x" * 100_000
