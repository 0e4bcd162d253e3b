"""Micro-benchmark: GNU ``tar -xzf`` against our decompress + apply_layer.

Not collected by pytest (the name does not start with ``test_``). Run it as a script::

    .venv/bin/python tests/archive/bench_apply.py [--size-mb 200] [--dir /dev/shm] [--runs 3]

It writes a gzip tar of three random files (~200 MB in total) under ``--dir``, extracts
it with both, and prints MB/s (uncompressed) and our share of tar's speed; the issue asks
for at least 60%. ``--dir`` defaults to /dev/shm so disk noise does not dominate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pycontainerd.archive import apply_layer, decompress_stream
from pycontainerd.archive._fsops import remove_all

if TYPE_CHECKING:
    from collections.abc import Callable


def make_archive(path: Path, size_mb: int) -> int:
    per_file = (size_mb << 20) // 3 >> 20 << 20
    with tarfile.open(path, "w:gz", compresslevel=6) as tf:
        for i in range(3):
            src = path.parent / f"src{i}"
            with open(src, "wb") as f:
                for _ in range(per_file >> 20):
                    f.write(os.urandom(1 << 20))
            tf.add(src, arcname=f"layer/file{i}")
            src.unlink()
    return 3 * per_file


def time_it(fn: Callable[[Path], None], runs: int, workdir: Path) -> float:
    best = float("inf")
    for _ in range(runs):
        target = workdir / "out"
        target.mkdir()
        os.sync()
        start = time.perf_counter()
        fn(target)
        best = min(best, time.perf_counter() - start)
        remove_all(str(target))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-apply-") as tmp:
        workdir = Path(tmp)
        archive = workdir / "layer.tar.gz"
        payload = make_archive(archive, args.size_mb)

        def gnu_tar(target: Path) -> None:
            subprocess.run(["tar", "-xzf", str(archive), "-C", str(target)], check=True)

        def ours(target: Path) -> None:
            with open(archive, "rb", buffering=0) as f:
                apply_layer(target, decompress_stream(f), overlay=False)

        mb = payload / 1e6
        t_tar = time_it(gnu_tar, args.runs, workdir)
        t_ours = time_it(ours, args.runs, workdir)
        size = archive.stat().st_size / 1e6
        print(f"archive: {size:.0f} MB gzip, {mb:.0f} MB payload, dir {args.dir}")
        print(f"tar -xzf     : {t_tar:.3f} s  {mb / t_tar:8.1f} MB/s")
        print(f"apply_layer  : {t_ours:.3f} s  {mb / t_ours:8.1f} MB/s")
        print(f"ratio        : {t_tar / t_ours:.0%} of GNU tar (target >= 60%)")


if __name__ == "__main__":
    main()
