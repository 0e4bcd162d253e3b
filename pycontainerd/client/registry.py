"""A client of the OCI distribution API (v2): manifests, blobs, uploads and auth.

Hosts are configured per name (``RegistryHost``): HTTPS verified against the system
roots or a CA file, plain HTTP only for hosts marked ``insecure``, and optional
credentials. Authentication follows the ``WWW-Authenticate`` challenge of a 401: Basic
sends the host's credentials; Bearer fetches a token from the challenge's realm (with
the credentials, if any) for the challenge's scope and retries. Credentials and tokens
go only to the registry host and its token realm: a redirect to another host is
followed without them, and URLs listed in manifests (``urls``) are never used at all
(CVE-2020-15157).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urljoin, urlsplit

from pycontainerd.client._http import HTTPClient, Response
from pycontainerd.client.content import MAX_JSON
from pycontainerd.client.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Descriptor,
    sha256_digest,
)
from pycontainerd.errdefs import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PycdError,
    Unauthorized,
    Unavailable,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping

    from pycontainerd.client.reference import Reference

__all__ = ["BlobGet", "Registry", "RegistryHost", "Unauthorized"]

ACCEPT_MANIFESTS = ", ".join([MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST])
MAX_REDIRECTS = 5
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class BlobGet:
    """A blob's GET, ready to be made by a blocking client (see ``Registry.blob_get``)."""

    url: str
    headers: dict[str, str]
    tls: ssl.SSLContext | None


@dataclass(frozen=True, slots=True)
class RegistryHost:
    """How to reach one registry host."""

    insecure: bool = False  # speak plain HTTP to it (never implied)
    ca_file: str | None = None
    ca_pem: str = ""  # the CA certificates themselves, instead of a file
    username: str = ""
    password: str = ""


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _media_type(resp: Response, data: bytes) -> str:
    mt = resp.header("content-type").split(";", 1)[0].strip()
    if mt in INDEX_TYPES or mt in MANIFEST_TYPES:
        return mt
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        declared = doc.get("mediaType")
        if declared in INDEX_TYPES or declared in MANIFEST_TYPES:
            return str(declared)
        if "manifests" in doc:
            return MT_OCI_INDEX
        if "config" in doc:
            return MT_OCI_MANIFEST
    raise InvalidArgument(f"{resp.url}: unknown manifest media type {mt!r}")


class Registry:
    """Talks to registries; one instance may serve many pulls and pushes at once."""

    def __init__(self, hosts: Mapping[str, RegistryHost] | None = None) -> None:
        self.hosts = dict(hosts or {})
        self._http: dict[str, HTTPClient] = {}
        self._auth: dict[str, str] = {}

    def config(self, host: str) -> RegistryHost:
        return self.hosts.get(host, RegistryHost())

    def _client(self, host: str) -> HTTPClient:
        if host not in self._http:
            cfg = self.config(host)
            ctx = None
            if cfg.ca_pem:
                ctx = ssl.create_default_context(cadata=cfg.ca_pem)
            elif cfg.ca_file:
                ctx = ssl.create_default_context(cafile=cfg.ca_file)
            self._http[host] = HTTPClient(ctx)
        return self._http[host]

    def base_url(self, host: str) -> str:
        endpoint = "registry-1.docker.io" if host == "docker.io" else host
        return ("http://" if self.config(host).insecure else "https://") + endpoint

    # ------------------------------------------------------------------ plumbing

    async def request(
        self,
        ref: Reference,
        method: str,
        path_or_url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        content_length: int | None = None,
        actions: str = "pull",
    ) -> Response:
        """One request with auth (retrying once after a challenge) and same-host redirects."""
        url = urljoin(self.base_url(ref.host) + "/", path_or_url)
        hdrs = dict(headers or {})
        for _ in range(MAX_REDIRECTS):
            same_host = urlsplit(url).netloc == urlsplit(self.base_url(ref.host)).netloc
            send = dict(hdrs)
            if same_host and ref.host in self._auth:
                send["Authorization"] = self._auth[ref.host]
            http = self._client(ref.host)
            resp = await http.request(method, url, send, body, content_length=content_length)
            if resp.status == 401 and same_host:
                challenge = resp.header_all("www-authenticate")
                await resp.aclose()
                if not isinstance(body, bytes | None):
                    raise Unauthorized(f"{ref.host}: authentication needed before a streamed body")
                await self._authenticate(ref, challenge, actions)
                send["Authorization"] = self._auth[ref.host]
                resp = await http.request(method, url, send, body, content_length=content_length)
                if resp.status == 401:
                    await resp.aclose()
                    raise Unauthorized(f"{ref.host}: credentials rejected for {ref.repository}")
            if resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = resp.header("location")
                await resp.aclose()
                if not location:
                    raise InvalidArgument(f"{url}: redirect without a location")
                url = urljoin(url, location)
                continue
            return resp
        raise InvalidArgument(f"{url}: too many redirects")

    async def _authenticate(self, ref: Reference, challenges: list[str], actions: str) -> None:
        cfg = self.config(ref.host)
        for header in challenges:
            scheme, params = _parse_challenge(header)
            if scheme == "basic":
                if not cfg.username:
                    raise Unauthorized(f"{ref.host} requires credentials")
                raw = f"{cfg.username}:{cfg.password}".encode()
                self._auth[ref.host] = "Basic " + base64.b64encode(raw).decode()
                return
            if scheme == "bearer":
                self._auth[ref.host] = "Bearer " + await self._token(ref, params, actions)
                return
        raise Unauthorized(f"{ref.host}: unsupported authentication challenge {challenges!r}")

    async def _token(self, ref: Reference, params: dict[str, str], actions: str) -> str:
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise Unauthorized(f"{ref.host}: bad token realm {realm!r}")
        if parts.scheme == "http" and not self.config(ref.host).insecure:
            raise Unauthorized(f"{ref.host}: token realm {realm!r} is not HTTPS")
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:{actions}"}
        if params.get("service"):
            query["service"] = params["service"]
        url = realm + ("&" if parts.query else "?") + urlencode(query)
        cfg = self.config(ref.host)
        headers = {}
        if cfg.username:
            raw = f"{cfg.username}:{cfg.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        resp = await self._client(ref.host).request("GET", url, headers)
        data = await resp.read(1 << 20)
        if resp.status != 200:
            raise Unauthorized(f"{ref.host}: token request failed with {resp.status}")
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise Unauthorized(f"{ref.host}: token endpoint answered no token")
        return token

    @staticmethod
    async def _fail(resp: Response, what: str) -> PycdError:
        try:
            body = (await resp.read(64 << 10)).decode(errors="replace")
        except PycdError:
            body = ""  # an error body is a courtesy; a broken one must not hide the status
        try:
            errs = json.loads(body).get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs)
        except (ValueError, AttributeError):
            detail = body[:200]
        msg = f"{what}: {resp.status} {resp.reason} {detail}".strip()
        if resp.status == 404:
            return NotFound(msg)
        if resp.status in (401, 403):
            return Unauthorized(msg)
        if resp.status >= 500 or resp.status == 429:
            return Unavailable(msg)
        if resp.status == 400:
            return InvalidArgument(msg)
        return FailedPrecondition(msg)

    # ------------------------------------------------------------------ pull side

    async def get_manifest(
        self, ref: Reference, obj: str | None = None
    ) -> tuple[Descriptor, bytes]:
        """Fetch a manifest or index by tag or digest; its descriptor and verified bytes."""
        obj = obj or ref.object
        resp = await self.request(
            ref, "GET", f"/v2/{ref.repository}/manifests/{obj}", {"Accept": ACCEPT_MANIFESTS}
        )
        if resp.status != 200:
            raise await self._fail(resp, f"manifest {ref.name}:{obj}")
        data = await resp.read(MAX_JSON)
        digest = sha256_digest(data)
        if obj.startswith("sha256:") and digest != obj:
            raise DataLoss(f"manifest {ref.name}@{obj}: content has digest {digest}")
        return Descriptor(_media_type(resp, data), digest, len(data)), data

    async def fetch_blob(
        self, ref: Reference, desc: Descriptor, offset: int = 0
    ) -> AsyncIterator[bytes]:
        """Stream a blob from ``offset`` (a Range request; a server ignoring it is handled)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = await self.request(ref, "GET", f"/v2/{ref.repository}/blobs/{desc.digest}", headers)
        if resp.status not in (200, 206):
            raise await self._fail(resp, f"blob {desc.digest}")
        skip = offset if resp.status == 200 else 0
        async for chunk in resp.iter_bytes():
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            yield chunk

    def blob_get(self, ref: Reference, desc: Descriptor) -> BlobGet:
        """How to GET a blob from another thread (``client.blocking``): its URL, and the
        credentials this registry already settled (fetching the manifest did, for the
        same repository and scope). A GET they do not satisfy fails before its body, and
        the caller then uses :meth:`fetch_blob`, which authenticates."""
        url = urljoin(self.base_url(ref.host) + "/", f"/v2/{ref.repository}/blobs/{desc.digest}")
        headers = {"Authorization": self._auth[ref.host]} if ref.host in self._auth else {}
        tls = None if self.config(ref.host).insecure else self._client(ref.host).ssl_context
        return BlobGet(url, headers, tls)

    # ------------------------------------------------------------------ push side

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        resp = await self.request(
            ref, "HEAD", f"/v2/{ref.repository}/blobs/{digest}", actions="pull,push"
        )
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise await self._fail(resp, f"blob {digest}")

    async def upload_blob(
        self,
        ref: Reference,
        desc: Descriptor,
        source: Callable[[], AsyncIterable[bytes]],
        *,
        chunk_size: int | None = None,
    ) -> None:
        """Upload a blob: one PUT, or PATCHes of ``chunk_size`` bytes and a closing PUT."""
        resp = await self.request(
            ref, "POST", f"/v2/{ref.repository}/blobs/uploads/", None, b"", actions="pull,push"
        )
        if resp.status != 202:
            raise await self._fail(resp, f"upload of {desc.digest}")
        await resp.aclose()
        location = resp.header("location")
        if chunk_size:
            location = await self._patch_chunks(ref, location, desc, source, chunk_size)
            body: bytes | AsyncIterable[bytes] = b""
            length = 0
        else:
            body, length = source(), desc.size
        sep = "&" if "?" in location else "?"
        url = f"{location}{sep}{urlencode({'digest': desc.digest})}"
        headers = {"Content-Type": "application/octet-stream"}
        resp = await self.request(
            ref, "PUT", url, headers, body, content_length=length, actions="pull,push"
        )
        if resp.status != 201:
            raise await self._fail(resp, f"upload of {desc.digest}")
        await resp.aclose()

    async def _patch_chunks(
        self,
        ref: Reference,
        location: str,
        desc: Descriptor,
        source: Callable[[], AsyncIterable[bytes]],
        chunk_size: int,
    ) -> str:
        offset = 0
        buf = bytearray()

        async def send(data: bytes) -> str:
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(data) - 1}",
            }
            resp = await self.request(ref, "PATCH", location, headers, data, actions="pull,push")
            if resp.status != 202:
                raise await self._fail(resp, f"chunk of {desc.digest} at {offset}")
            await resp.aclose()
            return resp.header("location") or location

        async for chunk in source():
            buf += chunk
            while len(buf) >= chunk_size:
                location = await send(bytes(buf[:chunk_size]))
                offset += chunk_size
                del buf[:chunk_size]
        if buf:
            location = await send(bytes(buf))
            offset += len(buf)
        if offset != desc.size:
            raise DataLoss(f"blob {desc.digest}: read {offset} of {desc.size} bytes")
        return location

    async def put_manifest(self, ref: Reference, obj: str, media_type: str, data: bytes) -> str:
        """PUT a manifest or index under a tag or digest; returns the registry's digest."""
        resp = await self.request(
            ref,
            "PUT",
            f"/v2/{ref.repository}/manifests/{obj}",
            {"Content-Type": media_type},
            data,
            actions="pull,push",
        )
        if resp.status != 201:
            raise await self._fail(resp, f"manifest {ref.name}:{obj}")
        await resp.aclose()
        return resp.header("docker-content-digest") or sha256_digest(data)
