"""Bearer-token auth and credential scoping against a tiny in-process registry.

Debian's registry only does htpasswd (Basic) auth, so a token-auth registry is faked
here behind a real socket: a 401 with a Bearer challenge, a token endpoint that checks
Basic credentials, and a blob that redirects to a second server (another host:port),
which must receive no credentials."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import TYPE_CHECKING

import pytest

from pycontainerd.client.oci import Descriptor, sha256_digest
from pycontainerd.client.reference import parse
from pycontainerd.client.registry import Registry, RegistryHost, Unauthorized

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "x", "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [],
    }
).encode()
BLOB = b"blob bytes"


class Server:
    """HTTP/1.1 on 127.0.0.1, one request per connection; records request headers."""

    def __init__(
        self, handler: Callable[[str, str, dict[str, str]], tuple[int, dict[str, str], bytes]]
    ) -> None:
        self.handler = handler
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode()
        method, target, _ = line.split(" ", 2)
        headers: dict[str, str] = {}
        while h := (await reader.readline()).decode().strip():
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
        self.seen.append((target, headers))
        status, out_headers, body = self.handler(method, target, headers)
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in out_headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        writer.close()


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Server, Server]]:
    token = "tok-123"
    storage = Server(lambda m, t, h: (200, {}, BLOB))

    def registry(
        method: str, target: str, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        if target.startswith("/token"):
            good = "Basic " + base64.b64encode(b"bob:pw").decode()
            if headers.get("authorization") != good:
                return 401, {}, b""
            return 200, {}, json.dumps({"token": token}).encode()
        if headers.get("authorization") != f"Bearer {token}":
            realm = f"http://127.0.0.1:{main.port}/token"
            challenge = f'Bearer realm="{realm}",service="fake",scope="repository:r/x:pull"'
            return 401, {"WWW-Authenticate": challenge}, b""
        if "/manifests/" in target:
            return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, MANIFEST
        location = f"http://localhost:{storage.port}/data"
        return 307, {"Location": location}, b""

    main = Server(registry)
    async with main, storage:
        yield main, storage


async def test_bearer_token_and_no_credentials_on_redirect(servers: tuple[Server, Server]) -> None:
    main, storage = servers
    ref = parse(f"127.0.0.1:{main.port}/r/x:1")
    good = Registry({ref.host: RegistryHost(insecure=True, username="bob", password="pw")})
    desc, data = await good.get_manifest(ref)
    assert data == MANIFEST and desc.digest == sha256_digest(MANIFEST)
    token_calls = [t for t, _ in main.seen if t.startswith("/token")]
    assert token_calls and "scope=repository%3Ar%2Fx%3Apull" in token_calls[0]
    blob = Descriptor("x", sha256_digest(BLOB), len(BLOB))
    got = b"".join([c async for c in good.fetch_blob(ref, blob)])
    assert got == BLOB
    assert storage.seen and all("authorization" not in h for _, h in storage.seen)

    bad = Registry({ref.host: RegistryHost(insecure=True, username="bob", password="nope")})
    with pytest.raises(Unauthorized, match="token request failed"):
        await bad.get_manifest(ref)
