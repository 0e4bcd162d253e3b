"""Garbage collection and leases against the real daemon (reliability R8, R9), driven
through ``ctr`` and the generated lease and content stubs.

Every blob a test needs to outlive a collection is held by a lease or a
``containerd.io/gc.root`` label, as a real client holds it: the daemon is shared, and
any deletion anywhere may run a collection over every namespace.
"""

from __future__ import annotations

import secrets
import subprocess
from typing import TYPE_CHECKING

import grpc
import pytest

from tests.support.content_client import (
    add_lease_resource,
    code_of,
    content_info,
    create_lease,
    delete_lease,
    ingest,
    lease_ids,
    set_content_labels,
)
from tests.support.ctr_images import mounted_listing, table
from tests.support.daemon import CTR
from tests.support.fs_listing import diff_trees
from tests.support.images import (
    busybox_image,
    chain_id,
    expected_tree,
    feature_image,
    write_oci_archive,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.daemon import Daemon
    from tests.support.images import Image

pytestmark = [pytest.mark.ctr, pytest.mark.root]

GC_ROOT = "containerd.io/gc.root"
REF_CONTENT = "containerd.io/gc.ref.content"
REF_OVERLAY = "containerd.io/gc.ref.snapshot.overlayfs"
FLAT = "containerd.io/gc.flat"
EXPIRE = "containerd.io/gc.expire"
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def collect(ch: grpc.Channel, ns: str) -> None:
    """Run one collection and wait for it (deleting a lease with sync does)."""
    lease = "gc-trigger-" + secrets.token_hex(4)
    create_lease(ch, ns, lease)
    delete_lease(ch, ns, lease, sync=True)


def exists(ch: grpc.Channel, ns: str, digest: str) -> bool:
    try:
        content_info(ch, ns, digest)
    except grpc.RpcError as exc:
        code = exc.code()
    else:
        return True
    assert code == NOT_FOUND
    return False


def snapshot_keys(d: Daemon, ns: str) -> set[str]:
    return set(table(d.ctr("snapshots", "ls", namespace=ns).stdout))


def import_image(d: Daemon, ns: str, tmp_path: Path, image: Image, ref: str) -> None:
    archive = tmp_path / "image.tar"
    write_oci_archive(archive, {ref: image})
    d.ctr("images", "import", str(archive), namespace=ns)


def chain_keys(image: Image) -> set[str]:
    """The chain ID of every prefix of the image's layers: its committed snapshots."""
    return {chain_id(image.diff_ids[: i + 1]) for i in range(len(image.layers))}


def digests(image: Image) -> tuple[str, str, str]:
    """(manifest, config, first layer)."""
    return (
        image.descriptor()["digest"],
        image.config_descriptor["digest"],
        image.layer_blobs[0].digest,
    )


def test_leased_config_and_its_snapshot_survive_until_lease_deleted(
    daemon: Daemon, tmp_path: Path
) -> None:
    ns, ref, image = "gc-lease", "docker.io/library/bb:gc", busybox_image()
    manifest, config, layer = digests(image)
    import_image(daemon, ns, tmp_path, image, ref)
    with daemon.channel() as ch:
        create_lease(ch, ns, "hold-config")
        add_lease_resource(ch, ns, "hold-config", "content", config)
        daemon.ctr("images", "rm", "--sync", ref, namespace=ns)
        assert not exists(ch, ns, manifest) and not exists(ch, ns, layer)
        assert exists(ch, ns, config)
        # The config's gc.ref.snapshot.overlayfs label keeps the unpacked chain.
        assert snapshot_keys(daemon, ns) == {image.chain_id}
        delete_lease(ch, ns, "hold-config", sync=True)
        assert not exists(ch, ns, config)
        assert snapshot_keys(daemon, ns) == set()


def test_expired_lease_protects_nothing(daemon: Daemon, tmp_path: Path) -> None:
    ns, ref, image = "gc-expired", "docker.io/library/bb:expired", busybox_image()
    _, config, _ = digests(image)
    import_image(daemon, ns, tmp_path, image, ref)
    with daemon.channel() as ch:
        create_lease(ch, ns, "long-gone", {EXPIRE: "2001-01-01T00:00:00Z"})
        try:
            add_lease_resource(ch, ns, "long-gone", "content", config)
        except grpc.RpcError as exc:
            # The daemon may already have swept the expired lease away: fine too.
            code = exc.code()
            assert code == NOT_FOUND, code
        daemon.ctr("images", "rm", "--sync", ref, namespace=ns)
        assert not exists(ch, ns, config)
        assert snapshot_keys(daemon, ns) == set()
        assert "long-gone" not in lease_ids(ch, ns)
        # A write naming a lease that does not exist fails.
        assert code_of(ingest, ch, ns, "r", b"data", lease="long-gone") == NOT_FOUND


def test_gc_ref_content_labels_keep_blobs(daemon: Daemon) -> None:
    ns = "gc-refs"
    with daemon.channel() as ch:
        create_lease(ch, ns, "while-writing")
        a, b, c, d = (
            ingest(ch, ns, f"ref-{x}", f"blob {x}\n".encode(), lease="while-writing")
            for x in "abcd"
        )
        # b is a root; b -> a through a suffixed ref label, a -> d through the bare one.
        set_content_labels(ch, ns, b, {GC_ROOT: "2024-01-01T00:00:00Z", f"{REF_CONTENT}.m.0": a})
        set_content_labels(ch, ns, a, {REF_CONTENT: d})
        delete_lease(ch, ns, "while-writing", sync=True)
        assert [exists(ch, ns, x) for x in (a, b, c, d)] == [True, True, False, True]
        blobs = daemon.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
        assert not (blobs / c.split(":")[1]).exists()

        set_content_labels(ch, ns, b, {f"{REF_CONTENT}.m.0": ""})
        collect(ch, ns)
        assert [exists(ch, ns, x) for x in (a, b, d)] == [False, True, False]
        set_content_labels(ch, ns, b, {GC_ROOT: ""})
        collect(ch, ns)
        assert not exists(ch, ns, b)
        assert not (blobs / b.split(":")[1]).exists()


def test_flat_lease_keeps_only_its_direct_resources(daemon: Daemon, tmp_path: Path) -> None:
    ns, ref, image = "gc-flat", "docker.io/library/bb:flat", busybox_image()
    _, config, _ = digests(image)
    import_image(daemon, ns, tmp_path, image, ref)
    with daemon.channel() as ch:
        create_lease(ch, ns, "writing")
        child = ingest(ch, ns, "child", b"referenced only by a label\n", lease="writing")
        parent = ingest(ch, ns, "parent", b"holds a ref label\n", lease="writing")
        set_content_labels(ch, ns, parent, {f"{REF_CONTENT}.x": child})
        create_lease(ch, ns, "flat", {FLAT: ""})
        add_lease_resource(ch, ns, "flat", "content", parent)
        add_lease_resource(ch, ns, "flat", "content", config)
        delete_lease(ch, ns, "writing", sync=True)
        daemon.ctr("images", "rm", "--sync", ref, namespace=ns)
        assert exists(ch, ns, parent) and exists(ch, ns, config)
        assert not exists(ch, ns, child)
        # The config's snapshot label is not followed either.
        assert snapshot_keys(daemon, ns) == set()
        delete_lease(ch, ns, "flat", sync=True)
        assert not exists(ch, ns, parent) and not exists(ch, ns, config)


def test_flat_leased_snapshot_keeps_its_parents(daemon: Daemon, tmp_path: Path) -> None:
    # containerd (metadata/gc.go references()): a flat snapshot's labels are not followed,
    # but its parent is, or the snapshot could not be mounted.
    ns, ref, image = "gc-flat-snap", "docker.io/library/feature:flat", feature_image()
    import_image(daemon, ns, tmp_path, image, ref)
    keys = chain_keys(image)
    assert snapshot_keys(daemon, ns) == keys
    with daemon.channel() as ch:
        create_lease(ch, ns, "flat-snap", {FLAT: ""})
        add_lease_resource(ch, ns, "flat-snap", "snapshots/overlayfs", image.chain_id)
        daemon.ctr("images", "rm", "--sync", ref, namespace=ns)
        assert snapshot_keys(daemon, ns) == keys
        # And the kept snapshot still mounts, with every layer's files. (An active child,
        # not a view: `ctr snapshots view` sets no gc.root label, so a view is garbage.)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        daemon.ctr("snapshots", "prepare", "flat-check", image.chain_id, namespace=ns)
        cmd = daemon.ctr("snapshots", "mounts", str(mnt), "flat-check", namespace=ns).stdout
        subprocess.run(cmd.split(), check=True, capture_output=True)
        try:
            assert (mnt / "etc" / "passwd").is_file() and (mnt / "srv" / "l3file").is_file()
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        daemon.ctr("snapshots", "rm", "flat-check", namespace=ns)
        delete_lease(ch, ns, "flat-snap", sync=True)
        assert snapshot_keys(daemon, ns) == set()


def test_gc_ref_snapshot_label_keeps_snapshot(daemon: Daemon, tmp_path: Path) -> None:
    ns, ref, image = "gc-snap-label", "docker.io/library/bb:snaplabel", busybox_image()
    import_image(daemon, ns, tmp_path, image, ref)
    with daemon.channel() as ch:
        create_lease(ch, ns, "writing")
        holder = ingest(ch, ns, "holder", b"points at a snapshot\n", lease="writing")
        set_content_labels(
            ch,
            ns,
            holder,
            {GC_ROOT: "2024-01-01T00:00:00Z", f"{REF_OVERLAY}/rootfs": image.chain_id},
        )
        delete_lease(ch, ns, "writing", sync=True)
        daemon.ctr("images", "rm", "--sync", ref, namespace=ns)
        assert snapshot_keys(daemon, ns) == {image.chain_id}
        set_content_labels(ch, ns, holder, {f"{REF_OVERLAY}/rootfs": ""})
        collect(ch, ns)
        assert snapshot_keys(daemon, ns) == set()
        assert exists(ch, ns, holder)
        daemon.ctr("content", "rm", holder, namespace=ns)


def test_concurrent_imports_of_one_image(daemon: Daemon, tmp_path: Path) -> None:
    assert CTR is not None
    image = feature_image()
    ref = "docker.io/library/feature:race"
    archive = tmp_path / "race.tar"
    write_oci_archive(archive, {ref: image})
    keys = chain_keys(image)
    for round_ in range(2):
        ns = f"gc-race-{round_}"
        cmd = [CTR, "-a", daemon.address, "-n", ns, "images", "import", str(archive)]
        procs = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        rows = table(daemon.ctr("snapshots", "ls", namespace=ns).stdout)
        assert set(rows) == keys, rows
        assert all(r[-1] == "Committed" for r in rows.values()), rows
        tree = mounted_listing(daemon, ns, ref, tmp_path / f"mnt-{round_}")
        diff = diff_trees(expected_tree(image), tree, ignore_dir_mtime=True)
        assert diff == [], "\n".join(diff)
        assert set(table(daemon.ctr("snapshots", "ls", namespace=ns).stdout)) == keys
