"""Pull and push through a real registry (Debian's docker-registry on 127.0.0.1), against
both daemons: round trips, an image pushed by skopeo, a multi-platform index, a
registry dying midway through a pull (and the resume after it), TLS with a private CA,
basic auth with good and bad credentials, and bad references."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.services.snapshots.v1 import snapshots_pb2
from pycontainerd.client.oci import Platform
from pycontainerd.client.oci import host_platform as sdk_host_platform
from pycontainerd.client.pull import PULL_LABEL
from pycontainerd.client.registry import Registry, RegistryHost, Unauthorized
from pycontainerd.errdefs import InvalidArgument, NotFound, Unavailable
from tests.client.conftest import unique_ns
from tests.client.registry_support import SKOPEO, RegistryServer, plain, seed
from tests.support.images import (
    Image,
    Layer,
    busybox_image,
    host_platform,
    multi_platform_index,
    sha256_digest,
    write_oci_archive,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from pycontainerd.client import Client
    from pycontainerd.client.pull import Progress

pytestmark = pytest.mark.root


@pytest.fixture
def secure_registry() -> Iterator[RegistryServer]:
    r = RegistryServer(tls=True, users={"alice": "s3cret"}).start()
    yield r
    r.cleanup()


async def committed(client: Client, key: str) -> bool:
    try:
        resp = await client.call(
            client.snapshots_stub.Stat,
            snapshots_pb2.StatSnapshotRequest(snapshotter="overlayfs", key=key),
        )
    except NotFound:
        return False
    return bool(resp.info.kind == snapshots_pb2.COMMITTED)


async def test_push_remove_pull_round_trip(
    any_client: Client, registry: RegistryServer, archives: dict[str, Path]
) -> None:
    [img] = await any_client.import_archive(archives["oci"], unpack=False)
    ref = f"{registry.host}/sdk/busybox:1"
    reg = plain(registry)
    pushed = await any_client.push(ref, img, reg)
    assert pushed.digest == img.target.digest
    await any_client.remove_image(img.name)
    fresh = any_client.with_namespace(unique_ns("pulled"))
    events: list[Progress] = []
    pulled = await fresh.pull(ref, reg, progress=events.append)
    assert pulled.name == ref
    assert pulled.target.digest == img.target.digest
    assert await committed(fresh, busybox_image().chain_id)
    # Blobs may be shared from the first namespace (no "start"): they still commit here.
    assert {e.kind for e in events} >= {"resolved", "manifest", "done", "unpacked"}
    # A second push finds every blob already there.
    seen: list[Progress] = []
    await any_client.with_namespace(fresh.namespace).push(ref, pulled, reg, progress=seen.append)
    assert sum(e.kind == "exists" for e in seen) == 2
    assert await fresh.list_leases() == []


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (apt install skopeo)")
async def test_pull_an_image_skopeo_pushed(
    any_client: Client, registry: RegistryServer, tmp_path: Path
) -> None:
    image = Image(layers=(busybox_image().layers[0], Layer().file("etc/motd", b"from skopeo\n")))
    archive = tmp_path / "skopeo.tar"
    write_oci_archive(archive, {"example.com/skopeo/img:1": image})
    ref = f"{registry.host}/skopeo/img:v1"
    assert SKOPEO is not None
    proc = await asyncio.create_subprocess_exec(
        SKOPEO, "copy", "--dest-tls-verify=false", f"oci-archive:{archive}", f"docker://{ref}",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    pulled = await any_client.pull(ref, plain(registry))
    resolved = await any_client.resolve_image(pulled)
    assert resolved.diff_ids == image.diff_ids
    assert await committed(any_client, image.chain_id)


async def test_multi_platform_index_pulls_host_platform(
    any_client: Client, registry: RegistryServer, tmp_path: Path
) -> None:
    index = multi_platform_index()
    archive = tmp_path / "multi.tar"
    write_oci_archive(archive, {"example.com/sdk/multi:1": index})
    [img] = await any_client.import_archive(archive, unpack=False)
    ref = f"{registry.host}/sdk/multi:1"
    reg = plain(registry)
    await any_client.push(ref, img, reg)
    fresh = any_client.with_namespace(unique_ns("multi"))
    pulled = await fresh.pull(ref, reg)
    assert pulled.target.media_type == "application/vnd.oci.image.index.v1+json"
    assert pulled.target.digest == sha256_digest(index.index_bytes)
    host = index.image_for(host_platform())
    assert await committed(fresh, host.chain_id)
    for other in index.images:
        if other is not host:
            assert not await fresh.content.exists(sha256_digest(other.manifest_bytes))
    # Only one platform is here, so pushing the whole index is refused clearly...
    with pytest.raises(Exception, match="push with a platform"):
        await fresh.push(f"{registry.host}/sdk/multi:copy", pulled, reg)
    # ...and pushing the host platform alone works.
    desc = await fresh.push(f"{registry.host}/sdk/multi:host", pulled, reg, platform=_host())
    assert desc.digest == sha256_digest(host.manifest_bytes)


def _host() -> Platform:
    return sdk_host_platform()


@pytest.fixture(scope="module")
def big_image() -> Image:
    """One 48 MiB incompressible layer: more than the socket buffers hold in flight."""
    layer = Layer().file("big.bin", os.urandom(48 << 20))
    return Image(layers=(layer,), compression="none", cmd=None)


async def test_registry_dies_midway_then_pull_resumes(
    any_client: Client, registry: RegistryServer, big_image: Image, tmp_path: Path
) -> None:
    ref = f"{registry.host}/sdk/big:1"
    reg = plain(registry)
    # Seeded straight from bytes: the daemon must not hold these blobs already.
    await seed(reg, ref, big_image)
    layer = big_image.layer_blobs[0]
    fresh = any_client

    # 1. The registry goes away right after the manifest: a clear error, nothing stored.
    def stop_after_manifest(p: Progress) -> None:
        if p.kind == "manifest":
            registry.kill()

    with pytest.raises(Unavailable, match="unreachable"):
        await fresh.pull(ref, reg, progress=stop_after_manifest)
    with pytest.raises(NotFound):
        await fresh.get_image(ref)
    registry.start()

    # 2. It dies again in the middle of the big layer: a partial ingest stays behind.
    def stop_midway(p: Progress) -> None:
        if p.kind == "bytes" and p.digest == layer.digest and p.offset >= 4 << 20:
            registry.kill()

    with pytest.raises(Unavailable):
        await fresh.pull(ref, reg, progress=stop_midway)
    partial = [s for s in await fresh.content.list_statuses() if layer.digest in s.ref]
    assert len(partial) == 1
    assert 0 < partial[0].offset < layer.size
    # The failed pull's lease stays, so the partial ingest survives garbage collection.
    [kept] = await fresh.list_leases()
    assert kept.labels[PULL_LABEL] == ref
    registry.start()

    # 3. The next pull resumes from the daemon's offset and the blob is whole.
    events: list[Progress] = []
    pulled = await fresh.pull(ref, reg, progress=events.append)
    starts = [e.offset for e in events if e.kind == "start" and e.digest == layer.digest]
    assert starts == [partial[0].offset]
    assert pulled.target.digest == sha256_digest(big_image.manifest_bytes)
    h = hashlib.sha256()
    async for chunk in fresh.content.read(layer.digest):
        h.update(chunk)
    assert "sha256:" + h.hexdigest() == layer.digest
    assert await committed(fresh, big_image.chain_id)
    assert await fresh.list_leases() == []


async def test_tls_and_basic_auth(
    any_client: Client, secure_registry: RegistryServer, archives: dict[str, Path]
) -> None:
    r = secure_registry
    assert r.ca is not None
    [img] = await any_client.import_archive(archives["oci"], unpack=False)
    ref = f"{r.host}/sdk/secure:1"
    good = Registry({r.host: RegistryHost(ca_file=str(r.ca), username="alice", password="s3cret")})
    bad = Registry({r.host: RegistryHost(ca_file=str(r.ca), username="alice", password="wrong")})
    anonymous = Registry({r.host: RegistryHost(ca_file=str(r.ca))})
    untrusted = Registry({r.host: RegistryHost(username="alice", password="s3cret")})

    with pytest.raises(Unauthorized, match="rejected"):
        await any_client.push(ref, img, bad)
    with pytest.raises(Unauthorized, match="requires credentials"):
        await any_client.push(ref, img, anonymous)
    with pytest.raises(Unavailable, match="not trusted"):
        await any_client.push(ref, img, untrusted)
    # Chunked upload this time (the round-trip test uses monolithic PUTs).
    await any_client.push(ref, img, good, chunk_size=256 << 10)
    fresh = any_client.with_namespace(unique_ns("secure"))
    with pytest.raises(Unauthorized):
        await fresh.pull(ref, bad)
    pulled = await fresh.pull(ref, good)
    assert pulled.target.digest == img.target.digest
    assert await committed(fresh, busybox_image().chain_id)


async def test_plain_http_only_when_marked_insecure(
    any_client: Client, registry: RegistryServer
) -> None:
    # Not marked insecure: we speak TLS to a plain HTTP server, and fail.
    with pytest.raises(Unavailable):
        await any_client.pull(f"{registry.host}/sdk/none:1", Registry())


async def test_bad_references_and_unknown_images(
    any_client: Client, registry: RegistryServer
) -> None:
    reg = plain(registry)
    for bad in ("UPPER/case:1", "a//b", f"{registry.host}/x:bad tag", "x@sha256:1234", ""):
        with pytest.raises(InvalidArgument):
            await any_client.pull(bad, reg)
    with pytest.raises(NotFound):
        await any_client.pull(f"{registry.host}/sdk/missing:1", reg)
