"""The blocking blob GET (``pycontainerd.client.blocking``) against small HTTP servers:
the body in pieces, a redirect to another host without the credentials, a failure
before the body (NotStarted: the caller uses the async client) and one midway
(Unavailable)."""

from __future__ import annotations

import http.server
import threading
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from pycontainerd.client.blocking import NotStarted, get_blob_blocking
from pycontainerd.client.registry import BlobGet
from pycontainerd.errdefs import Unavailable

if TYPE_CHECKING:
    from collections.abc import Iterator

BODY = bytes(range(256)) * 8192  # 2 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None]]] = []
    redirect_to: ClassVar[str] = ""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
        elif self.path == "/blob":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:1000])
            self.wfile.flush()
            self.connection.close()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture
def servers() -> Iterator[list[str]]:
    """Two servers (two hosts for the client: different ports)."""
    Handler.seen.clear()
    made = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    for s in made:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in made]
    for s in made:
        s.shutdown()
        s.server_close()


def test_body_in_pieces(servers: list[str]) -> None:
    pieces: list[bytes] = []
    n = get_blob_blocking(
        BlobGet(servers[0] + "/blob", {}, None), lambda v: pieces.append(bytes(v))
    )
    assert n == len(BODY) and b"".join(pieces) == BODY and len(pieces) >= 2


def test_redirect_drops_the_credentials(servers: list[str]) -> None:
    Handler.redirect_to = servers[1] + "/blob"
    got = bytearray()
    get = BlobGet(servers[0] + "/redirect", {"Authorization": "Bearer secret"}, None)
    assert get_blob_blocking(get, got.extend) == len(BODY)
    assert bytes(got) == BODY
    assert Handler.seen == [("/redirect", "Bearer secret"), ("/blob", None)]


def test_failures(servers: list[str]) -> None:
    got = bytearray()
    with pytest.raises(NotStarted):
        get_blob_blocking(BlobGet(servers[0] + "/missing", {}, None), got.extend)
    with pytest.raises(NotStarted):
        get_blob_blocking(BlobGet("http://127.0.0.1:1/blob", {}, None), got.extend)
    assert not got
    with pytest.raises(Unavailable):
        get_blob_blocking(BlobGet(servers[0] + "/short", {}, None), got.extend)
    assert bytes(got) == BODY[:1000]  # what came stays with the caller (for a resume)
