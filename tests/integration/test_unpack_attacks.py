"""Hostile layers through ``ctr images import`` into the real daemon (reliability §1.4).

Each layer aims at a sentinel file and directory under ``tmp_path``. Paths that climb
out with ``..`` or start at ``/``, and symlinks that point out, must stay inside the
snapshot, as in containerd (its unpack resolves every name and link inside the root);
links to files that are not in the root, a config whose diff_id does not match the
layer, and broken streams must fail the import. In every case the sentinel is untouched,
no snapshot is committed under the image's chain ID, no ``extract-*`` snapshot or mount
is left behind, and the daemon keeps serving.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.support.ctr_images import mounted_listing, mounts_under, table
from tests.support.images import Image, Layer, LayerBlob, sha256_digest, write_oci_archive

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.daemon import Daemon

pytestmark = [pytest.mark.ctr, pytest.mark.root]

PWNED = b"pwned\n"
UP = "../" * 16  # more than enough to climb out of any snapshot directory


class RawLayer(Layer):
    """A layer whose tar bytes are given as is (the builder refuses hostile names)."""

    def __init__(self, tar: bytes) -> None:
        super().__init__(comment="raw")
        self._raw = tar

    def tar_bytes(self) -> bytes:
        return self._raw


class WrongDiffIdLayer(Layer):
    """A sound layer whose config entry names another diff_id."""

    @property
    def diff_id(self) -> str:
        return sha256_digest(b"not the layer's tar")


class TruncatedGzipLayer(RawLayer):
    """A layer blob that is the first half of a gzip stream (its digest is of that half)."""

    def blob(self, compression: str = "gzip") -> LayerBlob:
        data = gzip.compress(self.tar_bytes(), mtime=0)
        data = data[: len(data) // 2]
        return LayerBlob("gzip", data, sha256_digest(data), self.diff_id)


def raw_tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """A PAX tar of (name, kind, data-or-link-target) members, names kept verbatim."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, arg in members:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.uname, ti.gname = 1_700_000_000, "", ""
            if kind == "file":
                assert isinstance(arg, bytes)
                ti.size, ti.mode = len(arg), 0o644
                tf.addfile(ti, io.BytesIO(arg))
                continue
            ti.type, ti.mode = {
                "dir": (tarfile.DIRTYPE, 0o755),
                "symlink": (tarfile.SYMTYPE, 0o777),
                "hardlink": (tarfile.LNKTYPE, 0o644),
            }[kind]
            if kind != "dir":
                assert isinstance(arg, str)
                ti.linkname = arg
            tf.addfile(ti)
    return buf.getvalue()


def short_file_tar() -> bytes:
    """A tar whose one file header declares 1 MiB but only 512 bytes follow (no EOF blocks)."""
    ti = tarfile.TarInfo("etc/big")
    ti.size, ti.mode, ti.mtime = 1 << 20, 0o644, 1_700_000_000
    return ti.tobuf(tarfile.PAX_FORMAT) + b"x" * 512


@dataclass(frozen=True)
class Case:
    """`build(victim_rel)` gives the layers; `contained` lists paths the attack must land
    on inside the root (None: the import must fail, with `error` in ctr's output)."""

    build: Callable[[str], tuple[Layer, ...]]
    contained: tuple[str, ...] | None = None
    error: str = ""
    snapshotter: str = "overlayfs"


def _raw(*members: tuple[str, str, bytes | str]) -> tuple[Layer, ...]:
    return (RawLayer(raw_tar(*members)),)


CASES = {
    "dotdot-traversal": Case(
        lambda v: _raw(("etc", "dir", ""), (f"{UP}{v}/dotdot", "file", PWNED)),
        contained=("{v}/dotdot",),
    ),
    "absolute-path": Case(
        lambda v: _raw(("etc", "dir", ""), (f"/{v}/absolute", "file", PWNED)),
        contained=("{v}/absolute",),
    ),
    "symlink-parent-absolute": Case(
        lambda v: _raw(("esc", "symlink", f"/{v}"), ("esc/via-abs-link", "file", PWNED)),
        contained=("{v}/via-abs-link",),
    ),
    "symlink-parent-relative": Case(
        lambda v: _raw(
            ("d", "dir", ""),
            ("d/esc", "symlink", f"{UP}{v}"),
            ("d/esc/via-rel-link", "file", PWNED),
        ),
        contained=("{v}/via-rel-link",),
    ),
    # A later layer writing below a symlink of an earlier one: containerd (both
    # snapshotters) replaces the symlink with a real directory.
    "symlink-parent-in-lower-layer": Case(
        lambda v: (Layer().symlink("x", f"/{v}"), Layer().file("x/from-upper-layer", PWNED)),
        contained=("x/from-upper-layer",),
    ),
    "symlink-parent-in-lower-layer-native": Case(
        lambda v: (Layer().symlink("x", f"/{v}"), Layer().file("x/from-upper-layer", PWNED)),
        contained=("x/from-upper-layer",),
        snapshotter="native",
    ),
    "hardlink-relative-escape": Case(
        lambda v: _raw(("etc", "dir", ""), ("hl", "hardlink", f"{UP}{v}/file")),
        error="no such file",
    ),
    "hardlink-absolute-escape": Case(
        lambda v: _raw(("etc", "dir", ""), ("hl", "hardlink", f"/{v}/file")),
        error="no such file",
    ),
    "hardlink-escape-with-decoy": Case(
        lambda v: _raw(
            (f"{v}/file", "file", b"decoy inside\n"), ("hl", "hardlink", f"{UP}{v}/file")
        ),
        contained=("{v}/file", "hl"),
    ),
    "diff-id-mismatch": Case(
        lambda v: (WrongDiffIdLayer().dir("etc").file("etc/x", b"x"),),
        error="wrong diff id",
    ),
    "truncated-gzip": Case(
        lambda v: (
            TruncatedGzipLayer(raw_tar(("etc", "dir", ""), ("etc/f", "file", b"y" * 5000))),
        ),
        error="unexpected eof",
    ),
    "header-longer-than-data": Case(
        lambda v: (RawLayer(short_file_tar()),),
        error="unexpected eof",
    ),
}


def sentinel_state(victim: Path) -> dict[str, tuple[object, ...]]:
    """Everything an attack could change about the sentinel tree."""
    out: dict[str, tuple[object, ...]] = {}
    for p in [victim, *sorted(victim.rglob("*"))]:
        st = p.lstat()
        data = p.read_bytes() if p.is_file() else b""
        out[str(p)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, data)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_layer(daemon: Daemon, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_bytes(b"host secret\n")
    os.chmod(victim / "file", 0o600)
    before = sentinel_state(victim)
    v = str(victim).lstrip("/")

    image = Image(layers=case.build(v))
    ref = f"docker.io/library/hostile-{name}:1"
    archive = tmp_path / "hostile.tar"
    write_oci_archive(archive, {ref: image})
    ns = f"attack-{name}"
    sn = ("--snapshotter", case.snapshotter)
    res = daemon.ctr("images", "import", *sn, str(archive), namespace=ns, check=False)
    output = res.stdout + res.stderr

    assert sentinel_state(victim) == before
    assert not (tmp_path / "dotdot").exists()
    snaps = table(daemon.ctr("snapshots", *sn, "ls", namespace=ns).stdout)
    assert not [k for k in snaps if k.startswith("extract-")], snaps
    assert mounts_under(daemon.root) == []

    if case.contained is None:
        assert res.returncode != 0, output
        assert case.error in output.lower(), output
        assert image.chain_id not in snaps and snaps == {}, snaps
    else:
        assert res.returncode == 0, output
        assert image.chain_id in snaps
        tree = mounted_listing(daemon, ns, ref, tmp_path / "mnt", case.snapshotter)
        landed = [p.format(v=v) for p in case.contained]
        for path in landed:
            assert path in tree, sorted(tree)
        if name == "hardlink-escape-with-decoy":
            # The link shares the decoy's inode inside the root, never the host file's.
            assert tree["hl"].link_group == tree[landed[0]].link_group is not None
            assert tree["hl"].size == len(b"decoy inside\n")
        else:
            assert tree[landed[0]].size == len(PWNED)
        if name.startswith("symlink-parent-in-lower-layer"):
            assert tree["x"].type == "dir"
        assert sentinel_state(victim) == before
    assert "Server:" in daemon.ctr("version").stdout
