"""The test-image builder: blobs, manifests and archives are consistent, the tree model
applies OCI whiteout semantics, and real containerd imports the archives and unpacks them
into exactly the tree `expected_tree` predicts."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import stat
import tarfile
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.fs_listing import Entry, diff_trees, listing
from tests.support.images import (
    BUSYBOX,
    LONG_NAME,
    Image,
    ImageIndex,
    Layer,
    Platform,
    busybox_image,
    chain_id,
    decompress,
    expected_tree,
    feature_image,
    host_platform,
    multi_platform_index,
    sha256_digest,
    write_docker_archive,
    write_oci_archive,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.support.containerd import Containerd

needs_busybox = pytest.mark.skipif(
    not BUSYBOX.is_file(), reason="/bin/busybox missing (apt install busybox-static)"
)


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        out = {}
        for m in tf.getmembers():
            if m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
        return out


# ------------------------------------------------------------------------------ layers


def test_layer_tar_is_deterministic() -> None:
    a = feature_image.__wrapped__().layers[0].tar_bytes()  # uncached: a fresh build
    b = feature_image.__wrapped__().layers[0].tar_bytes()
    assert a == b


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_every_compression_decompresses_to_the_diff_id(compression: Any) -> None:
    layer = feature_image().layers[0]
    blob = layer.blob(compression)
    assert blob.digest == sha256_digest(blob.data)
    assert blob.size == len(blob.data)
    assert blob.diff_id == layer.diff_id == sha256_digest(layer.tar_bytes())
    assert sha256_digest(decompress(blob.data)) == layer.diff_id
    assert (blob.data == layer.tar_bytes()) == (compression == "none")
    suffix = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
    assert blob.media_type("oci") == "application/vnd.oci.image.layer.v1.tar" + suffix


def test_docker_media_types_and_no_docker_zstd() -> None:
    layer = Layer().file("a", b"x")
    assert layer.blob("gzip").media_type("docker") == (
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    )
    assert layer.blob("none").media_type("docker").endswith("rootfs.diff.tar")
    with pytest.raises(ValueError, match="zstd"):
        layer.blob("zstd").media_type("docker")


def test_layer_tar_headers_carry_every_entry_kind() -> None:
    base, l2, _ = feature_image().layers
    with tarfile.open(fileobj=io.BytesIO(base.tar_bytes())) as tf:
        m = {t.name: t for t in tf.getmembers()}
    assert m["data2/keep"].pax_headers["SCHILY.xattr.user.foo"] == "bar"
    assert m["usr/bin/tool-alias"].islnk() and m["usr/bin/tool-alias"].linkname == "usr/bin/tool"
    assert m["usr/bin/tool-alias"].mode == 0o755
    assert m["usr/bin/abs"].issym() and m["usr/bin/abs"].linkname == "/usr/bin/tool"
    assert m["dev/null-copy"].ischr() and (
        m["dev/null-copy"].devmajor,
        m["dev/null-copy"].devminor,
    ) == (1, 3)
    assert m["dev/fifo"].isfifo()
    assert m["bin/suid"].mode == 0o4755 and m["tmp"].mode == 0o1777
    assert m["opt/bigid"].uid == 3_000_000
    assert m["mtime/fraction"].mtime == 1_700_000_000.5
    assert LONG_NAME in m and "opt/unicodé-ファイル" in m
    with tarfile.open(fileobj=io.BytesIO(l2.tar_bytes())) as tf:
        names = tf.getnames()
    assert {"etc/.wh.to-delete", "opt/.wh.thing", "data/.wh..wh..opq"} <= set(names)


def test_hardlink_target_must_be_in_the_same_layer() -> None:
    with pytest.raises(ValueError, match="not in this layer"):
        Layer().hardlink("b", "a").tar_bytes()


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize("flavor", ["oci", "docker"])
def test_manifest_descriptors_match_the_blobs(flavor: Any) -> None:
    img = feature_image(compression="gzip", flavor=flavor)
    blobs = img.blobs()
    manifest = json.loads(img.manifest_bytes)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == img.descriptor()["mediaType"]
    for desc in [manifest["config"], *manifest["layers"]]:
        data = blobs[desc["digest"]]
        assert desc["size"] == len(data) and sha256_digest(data) == desc["digest"]
    config = json.loads(blobs[manifest["config"]["digest"]])
    assert config["rootfs"]["diff_ids"] == [
        sha256_digest(decompress(blobs[d["digest"]])) for d in manifest["layers"]
    ]
    assert config["config"]["Entrypoint"] == ["/bin/sh", "-c"]
    assert config["config"]["WorkingDir"] == "/srv"
    assert config["architecture"] == host_platform().architecture and config["os"] == "linux"
    assert len(config["history"]) == 3
    if flavor == "docker":
        assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"


def test_mixed_compression_per_layer() -> None:
    img = Image(layers=feature_image().layers, compression=("zstd", "none", "gzip"))
    kinds = [json_l["mediaType"] for json_l in json.loads(img.manifest_bytes)["layers"]]
    assert [k.rsplit(".", 1)[-1] for k in kinds] == ["tar+zstd", "tar", "tar+gzip"]


def test_chain_id_follows_the_image_spec() -> None:
    a, b = sha256_digest(b"a"), sha256_digest(b"b")
    assert chain_id([a]) == a
    assert chain_id([a, b]) == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()


def _check_descriptor(desc: dict[str, Any], blobs: dict[str, bytes], seen: set[str]) -> None:
    """Every descriptor reachable from `desc` names a blob of that size and digest."""
    algo, hexd = desc["digest"].split(":")
    data = blobs[f"blobs/{algo}/{hexd}"]
    assert len(data) == desc["size"] and hashlib.sha256(data).hexdigest() == hexd
    seen.add(desc["digest"])
    if desc["mediaType"].endswith(("index.v1+json", "manifest.list.v2+json")):
        for child in json.loads(data)["manifests"]:
            _check_descriptor(child, blobs, seen)
    elif desc["mediaType"].endswith(("manifest.v1+json", "manifest.v2+json")):
        doc = json.loads(data)
        for child in [doc["config"], *doc["layers"]]:
            _check_descriptor(child, blobs, seen)


@needs_busybox
def test_oci_archive_layout_is_complete(tmp_path: Path) -> None:
    refs: dict[str, Image | ImageIndex] = {
        "docker.io/library/busybox:latest": busybox_image("zstd"),
        "example.com/feature:v1": feature_image(),
        "example.com/multi:1.0": multi_platform_index(),
    }
    index = write_oci_archive(tmp_path / "a.tar", refs)
    files = _members(tmp_path / "a.tar")
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads(files["index.json"]) == index
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    names = [m["annotations"] for m in index["manifests"]]
    assert names[0] == {
        "io.containerd.image.name": "docker.io/library/busybox:latest",
        "org.opencontainers.image.ref.name": "latest",
    }
    assert names[2]["org.opencontainers.image.ref.name"] == "1.0"
    assert index["manifests"][2]["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["manifests"][0]["platform"] == host_platform().as_json()
    seen: set[str] = set()
    for desc in index["manifests"]:
        _check_descriptor(desc, files, seen)
    blob_names = {n for n in files if n.startswith("blobs/")}
    assert blob_names == {"blobs/" + d.replace(":", "/") for d in seen}


def test_oci_archive_annotation_modes(tmp_path: Path) -> None:
    img = Image(layers=(Layer().file("x", b"x"),))
    idx = write_oci_archive(tmp_path / "r.tar", {"example.com/a/b:tag": img}, annotate="ref-name")
    assert idx["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "tag"}
    idx = write_oci_archive(tmp_path / "n.tar", {}, untagged=[img])
    assert "annotations" not in idx["manifests"][0]


def test_docker_archive_layout(tmp_path: Path) -> None:
    img = feature_image()
    manifest = write_docker_archive(tmp_path / "d.tar", ["pcd/feature:1", "pcd/feature:two"], img)
    files = _members(tmp_path / "d.tar")
    assert json.loads(files["manifest.json"]) == manifest
    (entry,) = manifest
    assert entry["RepoTags"] == ["pcd/feature:1", "pcd/feature:two"]
    assert files[entry["Config"]] == img.config_bytes
    assert entry["Config"] == sha256_digest(img.config_bytes).split(":")[1] + ".json"
    # Docker save stores the layers uncompressed: their digests are the diff_ids.
    assert [sha256_digest(files[name]) for name in entry["Layers"]] == img.diff_ids
    assert all(name.endswith("/layer.tar") for name in entry["Layers"])
    top = entry["Layers"][-1].split("/")[0]
    assert json.loads(files["repositories"]) == {"pcd/feature": {"1": top, "two": top}}


@needs_busybox
def test_multi_platform_index_lists_the_platforms() -> None:
    index = multi_platform_index()
    doc = json.loads(index.index_bytes)
    plats = [m["platform"] for m in doc["manifests"]]
    assert plats == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
        {"architecture": "arm", "os": "linux", "variant": "v7"},
    ]
    for m, img in zip(doc["manifests"], index.images, strict=True):
        assert m["digest"] == img.descriptor()["digest"]
        config = json.loads(img.config_bytes)
        assert Platform(config["architecture"], config["os"], config.get("variant", "")) == (
            img.platform
        )
        tree = expected_tree(img)
        assert tree["etc/platform"].size == len(f"{img.platform}\n")
        real = tree["bin/busybox"].sha256 == hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()
        assert real == (img.platform == host_platform())


# ------------------------------------------------------------------------------ model


def test_expected_tree_applies_whiteouts_and_replacements() -> None:
    tree = expected_tree(feature_image())
    assert "etc/to-delete" not in tree
    rec = tree["etc/recreated"]
    assert (rec.type, rec.mode, rec.uid, rec.gid) == ("file", 0o600, 1000, 1000)
    assert rec.sha256 == hashlib.sha256(b"version three\n").hexdigest()
    # Opaque: only what layer 2 put in data/ is left.
    assert sorted(p for p in tree if p.startswith("data/")) == ["data/new"]
    assert tree["opt/thing"].type == "dir" and "opt/thing/inside" in tree
    assert tree["var/cache"].type == "file" and "var/cache/c1" not in tree
    assert "var/log" not in tree and "var/log/messages" not in tree
    assert "usr/bin/gone-link" not in tree
    assert tree["etc/alt"] == Entry("symlink", 0o777, target="motd", mtime_ns=1_700_000_000 * 10**9)
    assert tree["etc/chmodme"].mode == 0o755 and tree["etc/chmodme"].uid == 1000
    assert tree["etc/motd"].sha256 == hashlib.sha256(b"replaced\n").hexdigest()
    groups = {p: e.link_group for p, e in tree.items() if e.link_group}
    assert groups == {
        "usr/bin/tool": "usr/bin/tool",
        "usr/bin/tool-alias": "usr/bin/tool",
        "usr/bin/tool-2": "usr/bin/tool",
        "srv/l3file": "srv/l3file",
        "srv/l3link": "srv/l3file",
    }
    assert tree["dev/null-copy"].rdev == (1, 3) and tree["dev/fifo"].type == "fifo"
    assert tree["bin/suid"].mode == 0o4755 and tree["srv/shared"].mode == 0o2775
    assert tree["data2/keep"].xattrs == (("user.foo", b"bar"), ("user.other", b"x y z"))
    assert tree["mtime/fraction"].mtime_ns == 1_700_000_000_500_000_000
    assert tree["mtime/epoch"].mtime_ns == 0


def test_expected_tree_whiteout_in_same_layer_hides_only_lower() -> None:
    low = Layer().dir("d").file("d/a", b"low")
    # The re-added file comes before its whiteout in the tar: it must still survive.
    high = Layer().dir("d").file("d/a", b"high").whiteout("d/a").opaque("d").file("d/b", b"b")
    tree = expected_tree([low, high])
    assert sorted(tree) == ["d", "d/a", "d/b"]
    assert tree["d/a"].sha256 == hashlib.sha256(b"high").hexdigest()


def test_expected_tree_parents_not_in_the_layer() -> None:
    low = Layer().dir("kept", mode=0o700, uid=5)
    high = Layer().file("kept/f", b"f").file("made/deep/g", b"g")
    tree = expected_tree([low, high])
    # A parent the layer changes without listing it keeps its metadata; its mtime moves.
    assert (tree["kept"].mode, tree["kept"].uid, tree["kept"].mtime_ns) == (0o700, 5, None)
    assert tree["made/deep"] == Entry("dir", 0o755)


@needs_busybox
def test_expected_tree_of_busybox() -> None:
    tree = expected_tree(busybox_image())
    assert tree["bin/busybox"].sha256 == hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()
    assert tree["bin/sh"].target == "busybox" and tree["bin/httpd"].type == "symlink"
    assert tree["tmp"].mode == 0o1777 and tree["root"].mode == 0o700
    assert {"proc", "sys", "dev", "etc/passwd", "etc/group"} <= set(tree)
    assert json.loads(busybox_image().config_bytes)["config"]["Cmd"] == ["sh"]


# ------------------------------------------------------------------------------ listing


def test_listing_of_a_real_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"data")
    os.chmod(root / "d" / "f", 0o4750)
    os.link(root / "d" / "f", root / "hl")
    os.symlink("../nowhere", root / "d" / "ln")
    os.mkfifo(root / "p", 0o600)
    os.chmod(root / "p", 0o600)
    os.utime(root / "d" / "f", ns=(0, 123_456_789))
    os.setxattr(root / "d", "user.k", b"v")
    got = listing(root)
    assert sorted(got) == ["d", "d/f", "d/ln", "hl", "p"]
    f = got["d/f"]
    assert (f.type, f.mode, f.size, f.mtime_ns) == ("file", 0o4750, 4, 123_456_789)
    assert f.sha256 == hashlib.sha256(b"data").hexdigest()
    assert f.link_group == got["hl"].link_group == "d/f"
    assert got["d/ln"].type == "symlink" and got["d/ln"].target == "../nowhere"
    assert got["d/ln"].mode == 0o777 and got["d/ln"].link_group is None
    assert got["p"].type == "fifo" and got["p"].mode == 0o600
    assert got["d"].xattrs == (("user.k", b"v"),)
    if os.geteuid() == 0:
        os.mknod(root / "c", 0o640 | stat.S_IFCHR, os.makedev(1, 3))
        assert listing(root)["c"].rdev == (1, 3)


def test_diff_trees_reports_each_difference() -> None:
    a = {"x": Entry("file", 0o644, size=1, mtime_ns=5), "gone": Entry("dir", 0o755)}
    b = {"x": Entry("file", 0o600, size=1, mtime_ns=6), "new": Entry("fifo", 0o644)}
    assert diff_trees(a, b) == [
        "missing: gone (dir)",
        "unexpected: new (fifo)",
        "x: mode expected '0o644', got '0o600'",
        "x: mtime_ns expected 5, got 6",
    ]
    assert diff_trees(a, b, ignore=("mode", "mtime_ns"))[2:] == []
    assert diff_trees({"x": Entry("dir", 0o755)}, {"x": Entry("dir", 0o755, mtime_ns=9)}) == []


# ------------------------------------------------------------------------------ real containerd

_CONTAINERD_MARKS = (
    pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed"),
    pytest.mark.skipif(shutil.which("ctr") is None, reason="ctr is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="ctr images mount needs root"),
    needs_busybox,
    pytest.mark.slow,
)
_ns_counter = itertools.count()


def needs_containerd(fn: Callable[..., None]) -> Callable[..., None]:
    for mark in _CONTAINERD_MARKS:
        fn = mark(fn)
    return fn


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    from tests.support.containerd import Containerd

    ctd = Containerd().start()
    try:
        yield ctd
    finally:
        ctd.cleanup()


@pytest.fixture
def ns() -> str:
    """A namespace of the test's own in the shared containerd."""
    return f"imgb{next(_ns_counter)}"


@contextlib.contextmanager
def mounted(ctd: Containerd, ns: str, ref: str, target: Path, *flags: str) -> Iterator[Path]:
    target.mkdir()
    ctd.ctr("images", "mount", *flags, ref, str(target), namespace=ns)
    try:
        yield target
    finally:
        ctd.ctr("images", "unmount", "--rm", str(target), namespace=ns)


def _image_names(ctd: Containerd, ns: str) -> set[str]:
    return set(ctd.ctr("images", "ls", "-q", namespace=ns).stdout.split())


def _snapshot_keys(ctd: Containerd, ns: str) -> set[str]:
    lines = ctd.ctr("snapshots", "ls", namespace=ns).stdout.splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


def _oci(path: Path, ref: str, img: Image) -> tuple[Path, str, Image]:
    write_oci_archive(path, {ref: img})
    return path, ref, img


def _docker(path: Path, tag: str, img: Image, gz: bool = False) -> tuple[Path, str, Image]:
    write_docker_archive(path, [tag], img, compressed_layers=gz)
    return path, "docker.io/" + tag, img  # ctr normalizes RepoTags to full references


CASES: dict[str, Callable[[Path], tuple[Path, str, Image]]] = {
    "busybox-oci-gzip": lambda p: _oci(p, "example.com/bb:gzip", busybox_image("gzip")),
    "busybox-oci-zstd": lambda p: _oci(p, "example.com/bb:zstd", busybox_image("zstd")),
    "busybox-oci-none": lambda p: _oci(p, "example.com/bb:none", busybox_image("none")),
    "busybox-docker-save": lambda p: _docker(p, "pcd/busybox:saved", busybox_image("none")),
    "feature-oci-gzip": lambda p: _oci(p, "example.com/ft:gzip", feature_image("gzip")),
    "feature-oci-zstd": lambda p: _oci(p, "example.com/ft:zstd", feature_image("zstd")),
    "feature-oci-none": lambda p: _oci(p, "example.com/ft:none", feature_image("none")),
    "feature-docker-types": lambda p: _oci(
        p, "example.com/ft:dockertypes", feature_image("gzip", "docker")
    ),
    "feature-docker-save": lambda p: _docker(p, "pcd/feature:saved", feature_image()),
    "feature-docker-save-gzip": lambda p: _docker(p, "pcd/ft:gz", feature_image(), gz=True),
}


@needs_containerd
@pytest.mark.parametrize("case", sorted(CASES))
def test_real_containerd_unpacks_the_expected_tree(
    containerd: Containerd, ns: str, tmp_path: Path, case: str
) -> None:
    archive, name, img = CASES[case](tmp_path / "image.tar")
    out = containerd.ctr("images", "import", str(archive), namespace=ns).stdout
    assert f"unpacking {name} " in out
    assert _image_names(containerd, ns) == {name}
    assert img.chain_id in _snapshot_keys(containerd, ns)
    with mounted(containerd, ns, name, tmp_path / "mnt") as root:
        differences = diff_trees(expected_tree(img), listing(root))
    assert differences == []


@needs_containerd
def test_real_containerd_multi_platform_unpacks_the_host_only(
    containerd: Containerd, ns: str, tmp_path: Path
) -> None:
    index = multi_platform_index()
    write_oci_archive(tmp_path / "multi.tar", {"example.com/multi:1": index})
    containerd.ctr("images", "import", str(tmp_path / "multi.tar"), namespace=ns)
    assert _image_names(containerd, ns) == {"example.com/multi:1"}
    host = index.image_for(host_platform())
    others = [img for img in index.images if img is not host]
    keys = _snapshot_keys(containerd, ns)
    assert host.chain_id in keys
    assert not {img.chain_id for img in others} & keys
    with mounted(containerd, ns, "example.com/multi:1", tmp_path / "mnt") as root:
        assert (root / "etc/platform").read_text() == f"{host.platform}\n"
        assert diff_trees(expected_tree(host), listing(root)) == []


@needs_containerd
def test_real_containerd_all_platforms_keeps_every_platform(
    containerd: Containerd, ns: str, tmp_path: Path
) -> None:
    index = multi_platform_index(compression="zstd")
    write_oci_archive(tmp_path / "multi.tar", {"example.com/multi:all": index})
    containerd.ctr("images", "import", "--all-platforms", str(tmp_path / "multi.tar"), namespace=ns)
    arm64 = index.image_for(Platform("arm64"))
    flag = "--platform=linux/arm64"
    with mounted(containerd, ns, "example.com/multi:all", tmp_path / "mnt", flag) as root:
        assert (root / "etc/platform").read_text() == "linux/arm64\n"
        assert diff_trees(expected_tree(arm64), listing(root)) == []


@needs_containerd
def test_real_containerd_names_from_annotations_and_flags(
    containerd: Containerd, ns: str, tmp_path: Path
) -> None:
    img = busybox_image("gzip")
    # Only the OCI tag annotation: ctr prefixes it with --base-name.
    write_oci_archive(tmp_path / "ref.tar", {"example.com/base:v1": img}, annotate="ref-name")
    containerd.ctr(
        "images", "import", "--base-name", "example.com/base", "--digests",
        str(tmp_path / "ref.tar"), namespace=ns,
    )  # fmt: skip
    digest = img.descriptor()["digest"]
    assert _image_names(containerd, ns) == {
        "example.com/base:v1",
        f"example.com/base@{digest}",
    }
    # No annotation at all: only --index-name gives the import a name.
    write_oci_archive(tmp_path / "anon.tar", {}, untagged=[feature_image()])
    containerd.ctr(
        "images", "import", "--index-name", "example.com/anon:idx",
        str(tmp_path / "anon.tar"), namespace=ns,
    )  # fmt: skip
    assert "example.com/anon:idx" in _image_names(containerd, ns)
