"""A small HTTP/1.1 client on asyncio streams, enough for the OCI distribution API.

One connection per request (``Connection: close``), so a broken transfer never poisons
a pooled connection and parallel blob transfers are simply parallel connections.
Bodies stream in both directions: a response body is read by ``Content-Length``,
chunked encoding, or until close; a request body may be an async iterator of bytes with
a known length. Connection failures become ``Unavailable``; a body that ends early
raises ``Unavailable`` too, so callers can resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

from pycontainerd.errdefs import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Mapping

__all__ = ["HTTPClient", "Response"]

MAX_HEADER_LINE = 64 << 10
MAX_HEADERS = 200
READ_CHUNK = 1 << 20
# The stream reader's buffer limit: it stops reading the socket at twice this. At the
# 64 KiB a header line needs, a blob's body came in 128 KiB pieces, with the socket
# taken off and put back on epoll for each; header lines are checked on their own.
STREAM_LIMIT = READ_CHUNK


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    url: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _consumed: bool = False

    def header(self, name: str, default: str = "") -> str:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body in chunks; Unavailable when the connection drops before its end."""
        if self._consumed or self._reader is None:
            return
        self._consumed = True
        reader = self._reader
        try:
            if self.header("transfer-encoding").lower() == "chunked":
                async for chunk in _chunked(reader):
                    yield chunk
                return
            length = self.header("content-length")
            if length:
                left = int(length)
                while left > 0:
                    chunk = await reader.read(min(READ_CHUNK, left))
                    if not chunk:
                        raise Unavailable(f"{self.url}: connection closed with {left} bytes left")
                    left -= len(chunk)
                    yield chunk
                return
            while chunk := await reader.read(READ_CHUNK):
                yield chunk
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise Unavailable(f"{self.url}: {exc}") from exc
        finally:
            await self.aclose()

    async def read(self, limit: int) -> bytes:
        """The whole body; InvalidArgument when it exceeds ``limit`` bytes."""
        buf = bytearray()
        async for chunk in self.iter_bytes():
            buf += chunk
            if len(buf) > limit:
                await self.aclose()
                raise InvalidArgument(f"{self.url}: response is over the {limit} byte limit")
        return bytes(buf)

    async def aclose(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def _line(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readuntil(b"\r\n")
    if len(line) > MAX_HEADER_LINE:
        raise ValueError(f"a header line of {len(line)} bytes")
    return line


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        line = await _line(reader)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            # Trailers, then the final empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return
        left = size
        while left > 0:
            chunk = await reader.read(min(READ_CHUNK, left))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(chunk)
            yield chunk
        await reader.readexactly(2)


class HTTPClient:
    """Requests over fresh connections; ``ssl_context`` verifies ``https`` servers."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context

    @property
    def ssl_context(self) -> ssl.SSLContext:
        # Made on first use: loading the system's roots takes tens of milliseconds, which
        # a plain-HTTP registry never needs.
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        content_length: int | None = None,
    ) -> Response:
        """Send one request and read the response head; the body is the caller's to read."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(f"unsupported URL {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        try:
            reader, writer = await asyncio.open_connection(
                parts.hostname,
                port,
                ssl=self.ssl_context if tls else None,
                server_hostname=parts.hostname if tls else None,
                limit=STREAM_LIMIT,
            )
        except ssl.SSLCertVerificationError as exc:
            raise Unavailable(f"{url}: TLS certificate not trusted: {exc.verify_message}") from exc
        except (OSError, ssl.SSLError) as exc:
            raise Unavailable(f"{parts.netloc} unreachable: {exc}") from exc
        resp = Response(0, "", url, _reader=reader, _writer=writer)
        try:
            await self._send(writer, method, parts, headers or {}, body, content_length)
            await self._read_head(reader, resp)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError) as exc:
            await resp.aclose()
            raise Unavailable(f"{method} {url}: {exc}") from exc
        except BaseException:
            await resp.aclose()
            raise
        if method == "HEAD" or resp.status in (204, 304):
            await resp.aclose()
        return resp

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        parts: SplitResult,
        headers: Mapping[str, str],
        body: bytes | AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> None:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines.append("User-Agent: pycontainerd")
        if isinstance(body, bytes):
            content_length = len(body)
        if body is not None or method in ("PUT", "POST", "PATCH"):
            lines.append(f"Content-Length: {content_length or 0}")
        for k, v in headers.items():
            if "\r" in k + v or "\n" in k + v:
                raise InvalidArgument(f"header {k!r} holds a line break")
            lines.append(f"{k}: {v}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if isinstance(body, bytes):
            writer.write(body)
        elif body is not None:
            async for chunk in body:
                writer.write(chunk)
                await writer.drain()
        await writer.drain()

    async def _read_head(self, reader: asyncio.StreamReader, resp: Response) -> None:
        status_line = (await _line(reader)).decode("latin-1").rstrip("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/"):
            raise ValueError(f"not an HTTP response: {status_line[:60]!r}")
        code, _, reason = rest.partition(" ")
        resp.status, resp.reason = int(code), reason
        for _ in range(MAX_HEADERS):
            line = (await _line(reader)).decode("latin-1").rstrip("\r\n")
            if not line:
                return
            k, _, v = line.partition(":")
            resp.headers.append((k.strip().lower(), v.strip()))
        raise ValueError("too many response headers")
