"""Small helpers around ``ctr`` for image tests: parse its tables, mount an image and
list it, and find mounts a daemon left behind."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.support.daemon import mounts_under
from tests.support.fs_listing import listing

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.daemon import Daemon
    from tests.support.fs_listing import Entry

__all__ = ["mounted_listing", "mounts_under", "table"]


def table(out: str) -> dict[str, list[str]]:
    """A ctr listing as {first column: whitespace-split columns}, header dropped."""
    return {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}


def mounted_listing(
    d: Daemon, ns: str, ref: str, where: Path, snapshotter: str | None = None
) -> dict[str, Entry]:
    """`ctr images mount` `ref` at `where` (created), list the tree, then unmount with --rm."""
    sn = ["--snapshotter", snapshotter] if snapshotter else []
    where.mkdir()
    d.ctr("images", "mount", *sn, ref, str(where), namespace=ns)
    try:
        return listing(where)
    finally:
        d.ctr("images", "unmount", *sn, "--rm", str(where), namespace=ns)
