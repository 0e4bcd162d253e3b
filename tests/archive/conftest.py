"""Fixtures for the layer archive tests: tar builders, host sentinels, layer stacks.

Tars are built with ``tarfile`` *writing* (extraction is what the library must never do).
Everything runs on real files under ``tmp_path``; the tests need root (chown, mknod,
``trusted.*`` xattrs) and skip without it; overlay views need ``mount -t overlay``.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pycontainerd.archive import ApplyResult, apply_layer
from pycontainerd.archive._fsops import remove_all

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: unpacking sets owners, device nodes and trusted xattrs")


class TarBuilder:
    """Build a layer tar in memory, entry by entry."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=fmt)  # noqa: SIM115 - closed in bytes()

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None, **kw: Any) -> TarBuilder:
        for key, value in kw.items():
            setattr(info, key, value)
        self.tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return self

    def dir(self, name: str, mode: int = 0o755, **kw: Any) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 1_600_000_000
        return self._add(info, **kw)

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, 1_600_000_000
        return self._add(info, data, **kw)

    def symlink(self, name: str, target: str, **kw: Any) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, 1
        return self._add(info, **kw)

    def link(self, name: str, target: str, mode: int = 0o644, **kw: Any) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.mtime = tarfile.LNKTYPE, target, mode, 1
        return self._add(info, **kw)

    def node(self, name: str, kind: bytes, major: int = 0, minor: int = 0, **kw: Any) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.devmajor, info.devminor, info.mode = kind, major, minor, 0o660
        return self._add(info, **kw)

    def xattrs(self, **records: str) -> dict[str, str]:
        return {"SCHILY.xattr." + k.replace("__", "."): v for k, v in records.items()}

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


@pytest.fixture
def tar() -> type[TarBuilder]:
    return TarBuilder


def _fingerprint(path: Path) -> tuple[object, ...]:
    st = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(st.st_mode) else sorted(os.listdir(path))
    return (content, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink, st.st_ino)


@dataclass
class Sentinel:
    """A host file and directory outside the root that no layer may touch."""

    dir: Path
    file: Path
    before: tuple[object, ...] = field(default=())

    def record(self) -> None:
        self.before = (_fingerprint(self.dir), _fingerprint(self.file))

    def assert_unchanged(self) -> None:
        assert (_fingerprint(self.dir), _fingerprint(self.file)) == self.before


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Sentinel]:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_bytes(b"host secret")
    os.chmod(victim / "file", 0o400)
    os.utime(victim / "file", ns=(1_000_000_000, 1_000_000_000))
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    s = Sentinel(dir=victim, file=victim / "file")
    s.record()
    yield s
    # Every test doubles as a containment check, whatever it asserted itself.
    s.assert_unchanged()


class LayerStack:
    """Apply successive layers in one unpack mode.

    naive: every layer goes into ``root`` with whiteouts applied as deletions.
    overlay: each layer gets its own upperdir, earlier ones passed as ``lower_dirs``.
    """

    def __init__(self, base: Path, mode: str) -> None:
        self.base = base
        self.mode = mode
        self.uppers: list[Path] = []
        self.root = base / "root"
        self.root.mkdir()

    @property
    def overlay(self) -> bool:
        return self.mode == "overlay"

    @property
    def top(self) -> Path:
        """Where the last layer was written."""
        return self.uppers[-1] if self.overlay and self.uppers else self.root

    def apply(self, data: bytes, **kw: Any) -> ApplyResult:
        if not self.overlay:
            return apply_layer(self.root, io.BytesIO(data), overlay=False, **kw)
        upper = self.root if not self.uppers else self.base / f"upper{len(self.uppers)}"
        upper.mkdir(exist_ok=True)
        lowers = list(reversed(self.uppers))
        self.uppers.append(upper)
        return apply_layer(upper, io.BytesIO(data), overlay=True, lower_dirs=lowers, **kw)


@pytest.fixture(params=["naive", "overlay"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LayerStack]:
    base = tmp_path / "snap"
    base.mkdir()
    yield LayerStack(base, request.param)
    # Deep trees made by the path-length tests break pytest's recursive tmp cleanup.
    remove_all(str(base))


def tree(path: Path, *, dir_times: bool = False) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree except inode numbers (and dir times if asked)."""
    out: dict[str, tuple[object, ...]] = {}
    stack = [str(path)]
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            rel = os.path.relpath(entry.path, path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                with open(entry.path, "rb") as f:
                    detail: object = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(entry.path)
            else:
                detail = st.st_rdev
            xattrs = {
                k: os.getxattr(entry.path, k, follow_symlinks=False)
                for k in os.listxattr(entry.path, follow_symlinks=False)
                if not k.startswith("trusted.")
            }
            is_dir = stat.S_ISDIR(st.st_mode)
            mtime = st.st_mtime_ns if dir_times or not is_dir else None
            nlink = None if is_dir else st.st_nlink
            out[rel] = (kind, st.st_mode, st.st_uid, st.st_gid, detail, xattrs, mtime, nlink)
            if is_dir:
                stack.append(entry.path)
    return out


@pytest.fixture
def snapshot_tree() -> Any:
    return tree


def overlay_supported(tmp_path: Path) -> bool:
    probe = tmp_path / "ovl-probe"
    for d in ("l1", "l2", "m"):
        (probe / d).mkdir(parents=True)
    ok = mount_overlay([probe / "l2", probe / "l1"], probe / "m")
    if ok:
        subprocess.run(["umount", str(probe / "m")], check=True)
    return ok


def mount_overlay(lowers: list[Path], target: Path) -> bool:
    """Read-only overlay of ``lowers`` (topmost first) on ``target``; False if unsupported."""
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    res = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(target)],
        capture_output=True,
        check=False,
    )
    return res.returncode == 0


@pytest.fixture
def overlay_view(tmp_path: Path) -> Iterator[Any]:
    """``view(lowers) -> Path``: mount a read-only overlay, unmounted after the test."""
    if not overlay_supported(tmp_path):
        pytest.skip("overlayfs mounts are not available here")
    mounted: list[Path] = []

    def view(lowers: list[Path]) -> Path:
        target = tmp_path / f"merged{len(mounted)}"
        target.mkdir()
        assert mount_overlay(lowers, target)
        mounted.append(target)
        return target

    yield view
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)
