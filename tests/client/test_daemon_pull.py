"""The daemon's own pull (pycontainerd's Pull service): the registry's bytes go straight
to the daemon, which unpacks each layer into a staging directory while it downloads and
moves it into the snapshot afterwards.

The trees it gives are compared with a client-side pull of the same image (Diff.Apply
onto each parent, containerd's way) and with the model of what the layers describe,
including the cases where a layer staged before its parent exists must fix things up:
implied parent directories taking their attributes from a lower layer, whiteouts and
opaque directories, hardlinks. Bad layers fail as they do client-side and leave nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.services.snapshots.v1 import snapshots_pb2
from pycontainerd.client.registry import Registry, RegistryHost
from pycontainerd.errdefs import (
    FailedPrecondition,
    NotFound,
    PycdError,
    Unavailable,
    Unimplemented,
)
from tests.client.conftest import unique_ns
from tests.client.registry_support import RegistryServer, plain, seed
from tests.support.containerd import Containerd
from tests.support.ctr_images import mounted_listing
from tests.support.fs_listing import diff_trees
from tests.support.images import Image, Layer, expected_tree, feature_image, sha256_digest

if TYPE_CHECKING:
    from pathlib import Path

    from pycontainerd.client import Client
    from pycontainerd.client.pull import Progress
    from tests.support.daemon import Daemon

pytestmark = pytest.mark.root


def implied_parents_image() -> Image:
    """Layer 2 writes below directories it never lists: they must look as in layer 1
    (owner, mode, xattrs), or as created defaults where layer 1 has no such directory."""
    base = Layer(comment="owners and modes below").dirs("srv", "etc")
    base.dir("srv/shared", mode=0o2775, gid=50, xattrs={"user.kind": "shared"})
    base.dir("srv/private", mode=0o700, uid=1000, gid=1000).file("etc/a", b"a\n")
    base.file("srv/was-file", b"replaced by a directory in layer 2\n")
    top = Layer(comment="implied parents").file("srv/shared/deep/f", b"f\n")
    top.file("srv/private/g", b"g\n", uid=1000).file("new/dir/h", b"h\n")
    top.file("srv/was-file/inside", b"i\n").whiteout("etc/a").hardlink("new/dir/h2", "new/dir/h")
    return Image(layers=(base, top), compression="gzip", cmd=None)


def _fresh(img: Image) -> Image:
    """``img`` with a file of random bytes added to each layer."""
    tag = os.urandom(8).hex().encode()
    layers = tuple(
        Layer(*ly.entries, comment=ly.comment).file(f"fresh-{i}", tag)
        for i, ly in enumerate(img.layers)
    )
    return dataclasses.replace(img, layers=layers)


def staged(daemon: Daemon) -> set[str]:
    """The staging directories (blobs other tests wrote through Content.Write may wait
    there, unpacked on the side, until applied or expired)."""
    staging = daemon.root / "io.containerd.internal.v1.staging"
    assert staging.is_dir()
    return {p.name for p in staging.iterdir()}


@pytest.mark.parametrize(
    "image",
    [pytest.param(feature_image, id="feature"), pytest.param(implied_parents_image, id="implied")],
)
async def test_daemon_pull_same_tree_as_client_pull(
    client: Client, daemon: Daemon, registry: RegistryServer, tmp_path: Path, image: object
) -> None:
    # Blobs no other test wrote: a blob the daemon holds already is not downloaded again,
    # so nothing would be unpacked while it arrives.
    img = _fresh(image())  # type: ignore[operator]
    ref = f"{registry.host}/daemon/pull:1"
    reg = plain(registry)
    await seed(reg, ref, img)

    events: list[Progress] = []
    ns_daemon = client.namespace
    before = staged(daemon)
    pulled = await client.pull(ref, reg, in_daemon=True, progress=events.append)
    assert pulled.target.digest == sha256_digest(img.manifest_bytes)
    # Every layer was unpacked while it downloaded, none by Diff.Apply afterwards.
    extracted = {e.digest for e in events if e.kind == "extracted"}
    assert extracted == {blob.digest for blob in img.layer_blobs}
    assert staged(daemon) <= before  # nothing left behind

    ns_client = unique_ns("clientpull")
    other = client.with_namespace(ns_client)
    await other.pull(ref, reg, in_daemon=False)

    ours = mounted_listing(daemon, ns_daemon, ref, tmp_path / "daemon")
    theirs = mounted_listing(daemon, ns_client, ref, tmp_path / "client")
    # Directories that entries were added to carry the time of each unpack.
    assert diff_trees(theirs, ours, ignore_dir_mtime=True) == []
    if image is feature_image:
        assert diff_trees(expected_tree(img), ours) == []
    else:
        # (The test model knows nothing of setgid directories, so spot checks instead.)
        shared = ours["srv/shared"]
        assert (shared.mode, shared.gid, dict(shared.xattrs)) == (
            0o2775, 50, {"user.kind": b"shared"},
        )  # fmt: skip
        assert (ours["srv/private"].mode, ours["srv/private"].uid) == (0o700, 1000)
        assert ours["new/dir"].mode == 0o755 and ours["srv/was-file"].type == "dir"
        # Made inside the setgid srv/shared, a new directory takes its group.
        assert (ours["srv/shared/deep"].mode, ours["srv/shared/deep"].gid) == (0o755, 50)
        assert "etc/a" not in ours  # whited out
        assert ours["new/dir/h2"].link_group == "new/dir/h"


async def test_daemon_pull_without_unpack_and_into_native(
    client: Client, daemon: Daemon, registry: RegistryServer, tmp_path: Path
) -> None:
    # Blobs no other test stored: a blob another namespace holds is not downloaded again.
    base = Layer().dirs("etc", "opt").file("etc/id", os.urandom(64)).file("opt/x", b"x\n")
    top = Layer().dirs("etc").file("etc/two", os.urandom(64)).whiteout("opt/x").opaque("etc")
    img = Image(layers=(base, top, Layer().file("three", b"3\n")), compression="gzip", cmd=None)
    ref = f"{registry.host}/daemon/native:1"
    reg = plain(registry)
    await seed(reg, ref, img)
    events: list[Progress] = []
    await client.pull(ref, reg, in_daemon=True, unpack=False, progress=events.append)
    assert not [e for e in events if e.kind in ("extracted", "unpacked")]
    with pytest.raises(NotFound):
        await client.call(
            client.snapshots_stub.Stat,
            snapshots_pb2.StatSnapshotRequest(snapshotter="overlayfs", key=img.chain_id),
        )
    await client.remove_image(ref, sync=True)

    # native copies each parent: only the first layer's staging fits; the rest go
    # through Diff.Apply, and the tree is still right.
    events.clear()
    before = staged(daemon)
    await client.pull(ref, reg, in_daemon=True, snapshotter="native", progress=events.append)
    extracted = [e.digest for e in events if e.kind == "extracted"]
    assert extracted == [img.layer_blobs[0].digest]
    tree = mounted_listing(daemon, client.namespace, ref, tmp_path / "mnt", "native")
    assert diff_trees(expected_tree(img), tree) == []
    assert staged(daemon) <= before


async def test_daemon_pull_bad_layer_fails_cleanly(
    client: Client, daemon: Daemon, registry: RegistryServer
) -> None:
    bad = Layer(comment="a nameless whiteout").file("ok", b"fine\n").file("etc/.wh.", b"")
    img = Image(layers=(Layer().file("base", b"b\n"), bad), compression="gzip", cmd=None)
    ref = f"{registry.host}/daemon/bad:1"
    reg = plain(registry)
    await seed(reg, ref, img)
    before = staged(daemon)
    with pytest.raises(PycdError) as daemon_err:
        await client.pull(ref, reg, in_daemon=True)
    other = client.with_namespace(unique_ns("clientbad"))
    with pytest.raises(PycdError) as client_err:
        await other.pull(ref, reg, in_daemon=False)
    # The same error either way: Diff.Apply re-applies the layer that failed in staging.
    assert type(daemon_err.value) is type(client_err.value)
    assert str(daemon_err.value) == str(client_err.value)
    assert "invalid whiteout name" in str(daemon_err.value)
    snaps = daemon.ctr("snapshots", "ls", namespace=client.namespace).stdout
    assert "extract-" not in snaps
    assert staged(daemon) <= before


async def test_daemon_pull_digest_mismatch(client: Client, registry: RegistryServer) -> None:
    """The registry serves other bytes than the manifest names: nothing is committed."""
    img = Image(layers=(Layer().file("a", b"a\n" * 1000),), compression="gzip", cmd=None)
    ref = f"{registry.host}/daemon/mismatch:1"
    reg = plain(registry)
    await seed(reg, ref, img)
    # Corrupt the stored layer in the registry's storage (same size, other bytes).
    blob = img.layer_blobs[0]
    hexd = blob.digest.split(":", 1)[1]
    data = registry.dir / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(FailedPrecondition, match="digest"):
        await client.pull(ref, reg, in_daemon=True)
    assert not await client.content.exists(blob.digest)


async def test_in_daemon_needs_the_service(any_client: Client, any_daemon: Daemon) -> None:
    """containerd has no Pull service: in_daemon=True says so, the default falls back."""
    reg = Registry({"127.0.0.1:1": RegistryHost(insecure=True)})
    ref = "127.0.0.1:1/none/such:1"
    expected = Unimplemented if isinstance(any_daemon, Containerd) else Unavailable
    with pytest.raises(expected):
        await any_client.pull(ref, reg, in_daemon=True)
    # The default pulls wherever it can: either way the registry is down.
    with pytest.raises(Unavailable):
        await any_client.pull(ref, reg)
