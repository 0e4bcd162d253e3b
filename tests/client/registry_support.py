"""Debian's distribution registry (``docker-registry``) run by the tests on 127.0.0.1.

``RegistryServer`` writes a config with filesystem storage in a temp dir and picks a
free port; ``tls=True`` makes a throwaway CA and a server certificate for 127.0.0.1
with the ``openssl`` CLI, ``users`` adds htpasswd basic auth (bcrypt hashes from the
system ``crypt``). ``kill()`` / ``start()`` stop and restart it on the same port and
storage, for tests of a registry going away mid-pull.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pycontainerd.client.oci import Descriptor
from pycontainerd.client.reference import parse
from pycontainerd.client.registry import Registry, RegistryHost

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from tests.support.images import Image

REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
OPENSSL = shutil.which("openssl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bcrypt(password: str) -> str:
    code = "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, password],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for 127.0.0.1 and localhost."""
    assert OPENSSL is not None

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=pycontainerd test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip
    return d / "ca.pem", d / "server.pem", d / "server.key"


class RegistryServer:
    def __init__(self, *, tls: bool = False, users: dict[str, str] | None = None) -> None:
        if REGISTRY is None:
            pytest.skip("docker-registry is not installed (apt install docker-registry)")
        if tls and OPENSSL is None:
            pytest.skip("openssl is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="pcd-reg-"))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.ca: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.dir / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if tls:
            self.ca, cert, key = make_ca_and_cert(self.dir)
            lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if users:
            htpasswd = self.dir / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{_bcrypt(p)}\n" for u, p in users.items()))
            lines += ["auth:", "  htpasswd:", "    realm: test-realm", f"    path: {htpasswd}"]
        self.config = self.dir / "config.yml"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 20.0) -> RegistryServer:
        assert REGISTRY is not None
        log = (self.dir / "registry.log").open("ab")
        self.proc = subprocess.Popen([REGISTRY, "serve", str(self.config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"registry did not listen: {self.log()}")

    def log(self) -> str:
        return (self.dir / "registry.log").read_text(errors="replace")

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash or a network cut would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def registry() -> Iterator[RegistryServer]:
    """A plain-HTTP registry on 127.0.0.1 for one test (tests/conftest.py offers it)."""
    r = RegistryServer().start()
    yield r
    r.cleanup()


def plain(r: RegistryServer) -> Registry:
    """A registry client that speaks plain HTTP to ``r``."""
    return Registry({r.host: RegistryHost(insecure=True)})


async def seed(reg: Registry, ref: str, image: Image) -> None:
    """Upload an image's blobs and manifest with the registry client alone."""
    r = parse(ref)
    for digest, data in image.blobs().items():
        if data == image.manifest_bytes:
            continue
        desc = Descriptor("application/octet-stream", digest, len(data))

        async def source(data: bytes = data) -> AsyncIterator[bytes]:
            for i in range(0, len(data), 1 << 20):
                yield data[i : i + (1 << 20)]

        await reg.upload_blob(r, desc, source)
    await reg.put_manifest(r, r.object, image.manifest_media_type, image.manifest_bytes)
